"""main.py on several devices and processes: samples must not depend on how the work is split.

Every run is a real `main.py` subprocess on the CPU. `--xla_force_host_platform_device_count`
gives a process several CPU devices, and the two-process run starts the JAX distributed runtime
with its coordinator on 127.0.0.1.
"""

import json
import socket
import subprocess

import numpy as np
import pytest
import yaml

from main_runs import (N_SAMPLES, RUN_TIMEOUT, assert_same_run, cpu_env, load_samples,
                       main_command, only_folder, reference_run, run_main, write_config)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, digits_model_path):
    return reference_run(tmp_path_factory, digits_model_path)


def test_sharded_run_matches_single_device(reference, tmp_path, digits_model_path):
    # Chunks of 5 on 4 devices are padded to 8, while the reference draws chunks of 3 on 1 device.
    config = write_config(tmp_path / 'c.yml', digits_model_path, batch_size=5)
    result = run_main('--config', config, '--exp', tmp_path / 'exp', cwd=tmp_path, devices=4)
    assert 'on 4 devices (padded chunk 8)' in result.stderr
    assert_same_run(only_folder(tmp_path / 'exp'), reference)


def test_finished_run_has_no_chunk_folder(reference):
    assert not (reference / 'chunks').exists()
    assert json.loads((reference / 'run_complete.json').read_text())['n_samples'] == N_SAMPLES


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def test_two_processes_match_one(reference, tmp_path, digits_model_path):
    config = write_config(tmp_path / 'c.yml', digits_model_path)
    port = free_port()
    processes = []
    for process_id in (0, 1):
        # The coordinator (in process 0) listens on the loopback interface only.
        env = cpu_env(2, JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')
        command = main_command('--config', config, '--exp', tmp_path / 'exp', '--distributed',
                               '--coordinator_address', f'127.0.0.1:{port}', '--num_processes', 2,
                               '--process_id', process_id)
        processes.append(subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=RUN_TIMEOUT))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr

    # 3 chunks of 3: process 0 draws chunks 0 and 2, process 1 draws chunk 1.
    assert '2 of them by this process on 2 devices' in outputs[0][1]
    assert '1 of them by this process on 2 devices' in outputs[1][1]
    folder = only_folder(tmp_path / 'exp')
    assert (folder / 'stdout_process_1.txt').is_file()
    assert not (folder / 'chunks').exists()
    assert_same_run(folder, reference)


def test_bf16_precision_on_cpu_matches_float32(reference, tmp_path, digits_model_path):
    # Samples 0 and 1 depend only on the seed and their index, so a 2-sample run reproduces them.
    config = write_config(tmp_path / 'c.yml', digits_model_path, n_samples=2, batch_size=2)
    run_main('--config', config, '--exp', tmp_path / 'exp', '--precision', 'bf16', cwd=tmp_path)
    folder = only_folder(tmp_path / 'exp')
    assert yaml.safe_load((folder / 'args.yml').read_text())['precision'] == 'bf16'
    assert 'jax_default_matmul_precision=bfloat16' in (folder / 'stdout.txt').read_text()
    # The CPU computes convolutions in float32 whatever the precision setting.
    np.testing.assert_allclose(load_samples(folder), load_samples(reference)[:2], rtol=0,
                               atol=1e-5)


def test_distributed_rejects_process_id_out_of_range(tmp_path, digits_model_path):
    config = write_config(tmp_path / 'c.yml', digits_model_path)
    # The flags are checked before any connection to the coordinator address is made.
    result = run_main('--config', config, '--exp', tmp_path / 'exp', '--distributed',
                      '--coordinator_address', '127.0.0.1:1', '--num_processes', 2,
                      '--process_id', 2, cwd=tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert '--process_id must be below --num_processes (2), got 2' in lines[0]
    assert not (tmp_path / 'exp').exists()
