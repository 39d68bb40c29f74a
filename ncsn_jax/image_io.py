"""Reading image sets in batches: a folder of PNG/JPEG files or an `.npz` with an `images` array.

Every batch is a float32 array (B, H, W, C) with values in [0, 1]. Folder images are decoded with
Pillow and converted to RGB (grayscale is repeated, the alpha channel of RGBA, LA and transparent
palette images is discarded, not composited); 16-bit grayscale is scaled by 1/65535. An `.npz`
array keeps its own channel count (1 or 3).

Images of different sizes cannot share a batch. When a folder mixes sizes, pass `size` to
`ImageSource.batches` and every image is resized on the host to size x size with the bilinear rule
of the FID Inception (align_corners=False, no antialiasing). With size 299, the Inception input
size, this gives the same result as resizing each image on the device, and all batches then share
one compiled network.
"""

import abc
import logging
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from ncsn_jax.errors import UserError
from ncsn_jax.inception import bilinear_resize_matrix

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

_SIXTEEN_BIT_GRAY_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
# Pillow's exceptions for files that are not images or are damaged. Its decompression-bomb check
# raises DecompressionBombError, which is not an OSError.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize one (H, W, C) float image to (size, size, C) with `bilinear_resize_matrix`."""
    height, width = image.shape[:2]
    if height == size and width == size:
        return image
    rows = bilinear_resize_matrix(height, size)
    cols = bilinear_resize_matrix(width, size)
    image = np.einsum('oh,hwc->owc', rows, image)
    return np.einsum('pw,owc->opc', cols, image).astype(np.float32)


def read_image(file) -> np.ndarray:
    """Decode one PNG/JPEG file to float32 RGB (H, W, 3) in [0, 1] (rules in the module docstring).

    Raises UserError when Pillow cannot decode the file or its pixels have no [0, 1] range.
    """
    try:
        with Image.open(file) as image:
            image.load()
            if image.mode in _SIXTEEN_BIT_GRAY_MODES:
                gray = np.asarray(image, dtype=np.float32) / 65535.0
                return np.repeat(gray[:, :, None], 3, axis=2)
            if image.mode in ('I', 'F'):
                raise UserError(f'cannot read image {file}: Pillow mode {image.mode!r} '
                                '(32-bit integer or float pixels) has no defined [0, 1] range; '
                                'save it as 8-bit or 16-bit PNG')
            rgb = np.asarray(image.convert('RGB'), dtype=np.float32)
    except _PIL_ERRORS as exc:
        raise UserError(f'cannot read image {file}: {exc}; remove or replace the file') from None
    return rgb / 255.0


class ImageSource(abc.ABC):
    """A set of images that can be read in batches, made by `open_image_source`."""

    path: Path
    count: int
    # (H, W, C) when all images share it, else None (a folder of mixed sizes).
    image_shape: tuple[int, int, int] | None

    @abc.abstractmethod
    def batches(self, batch_size: int, size: int | None = None):
        """Yield float32 batches (B, H, W, C) in [0, 1] of at most `batch_size` images, in order.

        With `size`, each image is first resized to size x size (see the module docstring).
        Without it, a folder of mixed sizes raises UserError.
        """


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')


class FolderImages(ImageSource):
    """PNG and JPEG files under a folder, searched recursively and read in sorted path order.

    Sizes are read from every file header when the source is opened, so a file that Pillow cannot
    identify is reported before any image is processed. A file that fails later, while it is
    decoded, is reported then.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.files = sorted((file for file in self.path.rglob('*')
                             if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file()),
                            key=lambda file: file.relative_to(self.path).as_posix())
        if not self.files:
            raise UserError(f'no images found in {self.path}: expected PNG or JPEG files '
                            f'({", ".join(IMAGE_EXTENSIONS)}) in it or its subfolders')
        self.count = len(self.files)
        self.sizes = [self._read_size(file) for file in self.files]
        first = self.sizes[0]
        uniform = all(size == first for size in self.sizes)
        self.image_shape = (first[1], first[0], 3) if uniform else None

    @staticmethod
    def _read_size(file: Path) -> tuple[int, int]:
        try:
            with Image.open(file) as image:
                return image.size
        except _PIL_ERRORS as exc:
            raise UserError(f'cannot read image {file}: {exc}; remove or replace the file') from None

    def _first_mismatch(self) -> str:
        first = self.sizes[0]
        index = next(i for i, size in enumerate(self.sizes) if size != first)
        return (f'{self.files[0]} is {first[0]}x{first[1]}, '
                f'{self.files[index]} is {self.sizes[index][0]}x{self.sizes[index][1]}')

    def batches(self, batch_size: int, size: int | None = None):
        _check_batch_size(batch_size)
        if size is None and self.image_shape is None:
            raise UserError(f'the images in {self.path} have different sizes '
                            f'({self._first_mismatch()}); resize them to one size first')
        for start in range(0, self.count, batch_size):
            images = [read_image(file) for file in self.files[start:start + batch_size]]
            if size is not None:
                images = [resize_image(image, size) for image in images]
            yield np.stack(images).astype(np.float32, copy=False)


class NpzImages(ImageSource):
    """The array `images` of an `.npz` file: NHWC, uint8 in [0, 255] or float in [0, 1].

    The whole array is loaded and checked (shape, dtype, range, finiteness) when the source is
    opened.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.images = self._read(self.path)
        self.count = self.images.shape[0]
        self.image_shape = tuple(self.images.shape[1:])

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
        try:
            data = np.load(path, allow_pickle=False)
        except unreadable as exc:
            raise UserError(f'cannot read {path}: not a valid .npz file ({type(exc).__name__})') \
                from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UserError(f'{path} contains a single .npy array; save the images with '
                            'np.savez(PATH, images=ARRAY)')
        with data:
            if 'images' not in data.files:
                raise UserError(f'{path} has no array named images (it has '
                                f'{", ".join(data.files) or "none"}); save the images with '
                                'np.savez(PATH, images=ARRAY)')
            try:
                images = data['images']
            except unreadable as exc:
                raise UserError(f'cannot read the images array of {path}: the file is damaged or '
                                f'the array is not numeric ({type(exc).__name__})') from None
        _check_npz_images(images, path)
        return images

    def batches(self, batch_size: int, size: int | None = None):
        _check_batch_size(batch_size)
        for start in range(0, self.count, batch_size):
            batch = self.images[start:start + batch_size]
            if batch.dtype == np.uint8:
                batch = batch.astype(np.float32) / 255.0
            else:
                batch = batch.astype(np.float32)
            if size is not None:
                batch = np.stack([resize_image(image, size) for image in batch])
            yield batch


def _check_npz_images(images: np.ndarray, path: Path) -> None:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = ''
        if images.ndim == 4 and images.shape[1] in (1, 3):
            hint = ' It looks like NCHW; transpose it with images.transpose(0, 2, 3, 1).'
        raise UserError(f'{path}: images has shape {images.shape}, expected (N, H, W, C) with C 1 '
                        f'or 3.{hint}')
    if images.shape[0] == 0:
        raise UserError(f'{path}: images is empty (shape {images.shape})')
    if images.dtype == np.uint8:
        return
    if not np.issubdtype(images.dtype, np.floating):
        raise UserError(f'{path}: images has dtype {images.dtype}; expected uint8 in [0, 255] or '
                        'float in [0, 1]')
    if not np.isfinite(images).all():
        raise UserError(f'{path}: images contains NaN or infinite values')
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise UserError(f'{path}: float images must lie in [0, 1], found values in '
                        f'[{low:.6g}, {high:.6g}]; rescale them (or store uint8 in [0, 255])')


def open_image_source(path) -> ImageSource:
    """Open a folder of PNG/JPEG images or an `.npz` file with an `images` array.

    Raises UserError for a missing path, a folder without images, an unreadable image (naming the
    file) or an `.npz` without a valid `images` array.
    """
    path = Path(path)
    if path.is_dir():
        source = FolderImages(path)
    elif path.is_file() and path.suffix.lower() == '.npz':
        source = NpzImages(path)
    elif path.exists():
        raise UserError(f'{path} is neither a folder of images nor an .npz file')
    else:
        raise UserError(f'image folder or .npz file not found: {path}; check the path')
    log.debug('opened %s: %d images of shape %s', path, source.count, source.image_shape)
    return source


def iter_image_batches(input_path, batch_size: int, size: int | None = None):
    """Open `input_path` and return an iterator over its float32 batches (B, H, W, C) in [0, 1].

    Opening errors are raised by this call, not by the first step of the iterator.
    """
    return open_image_source(input_path).batches(batch_size, size=size)
