"""Killing main.py and continuing with --resume, chunk files, and the streaming .npz writer.

A resumed run must end with the same samples, snapshots and record, bit for bit, as an
uninterrupted run of the same seed, chunk size and device count.
"""

import shutil
import signal
import subprocess
import time
import zipfile

import numpy as np
import pytest

from main_runs import (RUN_TIMEOUT, assert_identical_run, cpu_env, main_command, only_folder,
                       reference_run, run_main, write_config)
from ncsn_jax.chunks import InvalidChunk, NpzArrayWriter, load_chunk, save_chunk
from ncsn_jax.errors import UserError
from ncsn_jax.experiment import wait_for_chunk_files

N_CHUNKS = 3   # 7 samples in chunks of 3


@pytest.fixture(scope='module')
def reference(tmp_path_factory, digits_model_path):
    return reference_run(tmp_path_factory, digits_model_path)


@pytest.fixture(scope='module')
def killed_run(tmp_path_factory, digits_model_path):
    """Start a run, SIGKILL it once its first chunk file exists.

    Returns (experiment folder, names of the chunk files at the kill, a copy of the folder made
    right after the kill).
    """
    tmp = tmp_path_factory.mktemp('killed_run')
    config = write_config(tmp / 'c.yml', digits_model_path)
    with open(tmp / 'stderr.txt', 'w') as stderr:
        process = subprocess.Popen(main_command('--config', config, '--exp', tmp / 'exp'),
                                   cwd=tmp, env=cpu_env(), stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while not list((tmp / 'exp').glob('*/chunks/chunk_*.npz')):
                assert process.poll() is None, (tmp / 'stderr.txt').read_text()
                assert time.monotonic() < deadline, 'no chunk file appeared'
                time.sleep(0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    folder = only_folder(tmp / 'exp')
    assert not (folder / 'run_complete.json').exists(), 'the run finished before the kill'
    chunk_names = sorted(path.name for path in (folder / 'chunks').glob('chunk_*.npz'))
    copy = tmp / 'copy_at_kill'
    shutil.copytree(folder, copy)
    return folder, chunk_names, copy


@pytest.fixture(scope='module')
def resumed_run(killed_run):
    """Resume the killed run with --keep_chunks.

    Returns (folder, result, stat of chunk 0 before the resume).
    """
    folder, _, _ = killed_run
    before = (folder / 'chunks' / 'chunk_00000.npz').stat()
    result = run_main('--resume', folder, '--keep_chunks', cwd=folder.parent)
    return folder, result, before


def test_killed_run_resumes_bitwise(resumed_run, reference):
    folder, _, _ = resumed_run
    assert (folder / 'run_complete.json').is_file()
    assert_identical_run(folder, reference)
    assert 'resuming experiment folder' in (folder / 'stdout.txt').read_text()


def test_resume_skips_finished_chunks(killed_run, resumed_run):
    _, chunk_names, _ = killed_run
    folder, result, before = resumed_run
    assert 1 <= len(chunk_names) < N_CHUNKS
    assert f'{N_CHUNKS - len(chunk_names)} chunks left to draw' in result.stderr
    # A chunk drawn again would be a new file (written to a temporary name, then renamed).
    after = (folder / 'chunks' / 'chunk_00000.npz').stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_keep_chunks_leaves_chunk_files(resumed_run):
    folder, _, _ = resumed_run
    names = sorted(path.name for path in (folder / 'chunks').iterdir())
    assert names == [f'chunk_{chunk:05d}.npz' for chunk in range(N_CHUNKS)]
    with np.load(folder / 'chunks' / 'chunk_00002.npz') as data:
        assert sorted(data.files) == ['grid_snapshots', 'indices', 'meta', 'norm_sums',
                                      'samples', 'sha256', 'snapshots']
        assert data['indices'].tolist() == [6]
        assert data['snapshots'].shape == (2, 1, 32, 32, 1)
        # Grids after steps 0 and 2 show samples 0-3 only.
        assert data['grid_snapshots'].shape == (2, 0, 32, 32, 1)
        assert data['norm_sums'].shape == (10, 3)


def test_truncated_chunk_is_drawn_again(killed_run, reference, tmp_path):
    _, _, copy = killed_run
    folder = tmp_path / 'run'
    shutil.copytree(copy, folder)
    chunk = folder / 'chunks' / 'chunk_00000.npz'
    size = chunk.stat().st_size
    with open(chunk, 'r+b') as file:
        file.truncate(size // 2)

    result = run_main('--resume', folder, '--keep_chunks', cwd=tmp_path)

    warnings = [line for line in result.stderr.splitlines() if line.startswith('WARNING')]
    assert len(warnings) == 1, result.stderr
    assert 'chunk_00000.npz is invalid' in warnings[0]
    assert chunk.stat().st_size == size
    assert_identical_run(folder, reference)


def test_resume_of_finished_run_exits_zero(reference):
    samples = reference / 'image_samples' / 'samples_final.npz'
    before = samples.stat().st_mtime_ns
    result = run_main('--resume', reference, cwd=reference.parent)
    assert 'is complete' in result.stderr
    assert samples.stat().st_mtime_ns == before


def test_resume_rejects_bad_folders(tmp_path, reference):
    not_experiment = tmp_path / 'photos'
    not_experiment.mkdir()
    (not_experiment / 'cat.png').write_bytes(b'')
    broken = tmp_path / 'broken'
    shutil.copytree(reference, broken)
    (broken / 'args.yml').write_text('seed: [1\n')
    cases = [
        (['--resume', tmp_path / 'missing'], 'folder not found'),
        (['--resume', not_experiment],
         'not an experiment folder (args.yml and config.yml missing)'),
        (['--resume', broken], 'failed to read the saved arguments'),
        (['--resume', reference, '--seed', '7', '-P', '1'], 'remove --seed, --k_p'),
    ]
    for args, fragment in cases:
        result = run_main(*args, cwd=tmp_path, check=False)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert fragment in lines[0], lines[0]


def test_chunk_checksum_detects_changed_samples(tmp_path):
    path = tmp_path / 'chunk_00000.npz'
    meta = {'chunk': 0, 'steps': [0, 2]}
    save_chunk(path, meta, {'samples': np.ones((2, 4, 4, 1), np.float32)})
    assert load_chunk(path, meta)['samples'].shape == (2, 4, 4, 1)

    # Rewrite the file with one changed value and the old checksum, as a valid zip file.
    with np.load(path) as data:
        members = {name: data[name] for name in data.files}
    members['samples'][1, 2, 3, 0] = 0.5
    np.savez(path, **members)
    with pytest.raises(InvalidChunk, match='checksum does not match'):
        load_chunk(path, meta)


def test_chunk_from_other_settings_rejected(tmp_path):
    path = tmp_path / 'chunk_00000.npz'
    save_chunk(path, {'chunk': 0, 'seed': 1}, {'samples': np.zeros((1, 2, 2, 1), np.float32)})
    with pytest.raises(InvalidChunk, match=r'other run settings \(seed differ\)'):
        load_chunk(path, {'chunk': 0, 'seed': 2})


def test_npz_writer_streams_blocks(tmp_path):
    path = tmp_path / 'samples_final.npz'
    array = np.arange(7 * 3 * 3 * 1, dtype=np.float32).reshape(7, 3, 3, 1)
    writer = NpzArrayWriter(path, 'samples', array.shape)
    for start in (0, 3, 6):
        writer.write(array[start:start + 3])
    writer.close()

    with np.load(path) as data:
        assert data.files == ['samples']
        assert np.array_equal(data['samples'], array)
    with zipfile.ZipFile(path) as archive:
        assert [info.compress_type for info in archive.infolist()] == [zipfile.ZIP_STORED]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['samples_final.npz']


def test_npz_writer_rejects_missing_rows(tmp_path):
    writer = NpzArrayWriter(tmp_path / 'x.npz', 'samples', (4, 2))
    writer.write(np.zeros((3, 2)))
    with pytest.raises(ValueError, match='3 of 4 rows written'):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_gather_times_out_naming_missing_chunk(tmp_path):
    present = tmp_path / 'chunk_00000.npz'
    present.write_bytes(b'')
    started = time.monotonic()
    with pytest.raises(UserError, match=r'timed out after 0\.3 s .* 1 chunk files .*chunk_00001'):
        wait_for_chunk_files([present, tmp_path / 'chunk_00001.npz'], timeout=0.3, poll=0.05)
    assert time.monotonic() - started < 5
