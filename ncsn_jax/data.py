"""Training data: loading an image set into memory, the epoch order and per-batch augmentation.

Sources are the built-in `digits` set (scikit-learn's 1,797 8x8 digits, scaled to [0, 1] by
dividing by 16 and resized bilinearly) or, through `ncsn_jax.image_io`, a folder of PNG/JPEG
images or an `.npz` file with an `images` array. Each image is centre-cropped to a square and
resized to `data.image_size` with Pillow's bilinear filter, as torchvision's CenterCrop and Resize
do on PIL images. 8-bit sources stay 8-bit after resizing (stored as uint8, like torchvision's
PIL pipeline); other sources are stored as float32.
"""

import dataclasses
import hashlib
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ncsn_jax.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_DATASETS = ('digits',)
DIGITS_MAX_VALUE = 16.0  # scikit-learn's digits are integers in [0, 16]
GAUSSIAN_DEQUANTIZATION_STD = 0.01


@dataclasses.dataclass
class Dataset:
    """All training images in host memory: (N, S, S, C), uint8 in [0, 255] or float32 in [0, 1]."""

    images: np.ndarray
    source: str

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    def batch(self, indices) -> np.ndarray:
        """Return the images at `indices` as float32 in [0, 1]."""
        batch = self.images[np.asarray(indices)]
        if batch.dtype == np.uint8:
            return batch.astype(np.float32) / 255.0
        return batch.astype(np.float32, copy=False)

    def fingerprint(self) -> str:
        """SHA-256 of the stored images (shape, dtype and bytes), to detect changed data on resume."""
        digest = hashlib.sha256(f'{self.images.shape}{self.images.dtype}'.encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(data_config, path=None) -> Dataset:
    """Load the training set named by the `data` config section.

    `path` (a folder of images or an `.npz` file) is required unless `data.dataset` is a built-in
    set. Raises UserError when the data cannot be read or its channel count differs from
    `data.channels`.
    """
    name = data_config.dataset
    size = data_config.image_size
    channels = data_config.channels
    if path is None and name.lower() in BUILTIN_DATASETS:
        images = load_digits(size)
        source = 'scikit-learn digits'
    elif path is None:
        raise UserError(f'data.dataset {name!r} is not built in (built in: '
                        f'{", ".join(BUILTIN_DATASETS)}); set data.path in the config or pass --data '
                        'PATH, with a folder of PNG/JPEG images or an .npz file with an images '
                        'array')
    else:
        images = _load_path(Path(path), size, channels)
        source = str(path)
    found = images.shape[-1]
    if found != channels:
        raise UserError(f'data.channels is {channels} but {source} has {found} channel(s); set '
                        f'data.channels to {found} or use other data')
    log.info('training data: %d images of %dx%dx%d from %s', images.shape[0], size, size, found,
             source)
    return Dataset(images=images, source=source)


def load_digits(image_size: int) -> np.ndarray:
    """Return scikit-learn's digits as float32 (1797, size, size, 1) in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise UserError('the built-in digits dataset needs scikit-learn; install it with '
                        'pip install scikit-learn') from exc
    digits = sklearn_digits().images.astype(np.float32) / DIGITS_MAX_VALUE
    return np.stack([crop_and_resize(image[:, :, None], image_size) for image in digits])


def _load_path(path: Path, size: int, channels: int) -> np.ndarray:
    from ncsn_jax.image_io import FolderImages, open_image_source

    source = open_image_source(path)
    if isinstance(source, FolderImages):
        return _load_folder(source, size, channels)
    images = source.images
    if images.shape[1:3] != (size, size):
        images = np.stack([crop_and_resize(image, size) for image in
                           tqdm(images, desc='resizing', unit='image', leave=False)])
    return images if images.dtype == np.uint8 else images.astype(np.float32)


def _load_folder(source, size: int, channels: int) -> np.ndarray:
    """Read, crop and resize every image of a folder; grayscale folders give one channel.

    A folder counts as grayscale when every image has equal R, G and B values (image_io decodes
    every file to RGB). With `channels` 1 the first channel of grayscale images is kept.
    """
    from ncsn_jax.image_io import read_image

    images = []
    colour_file = None
    for file in tqdm(source.files, desc='loading images', unit='image', leave=False):
        image = read_image(file)
        as_uint8 = np.round(image * 255.0)
        if np.abs(as_uint8 - image * 255.0).max() < 1e-3:
            image = as_uint8.astype(np.uint8)
        if colour_file is None and not (np.array_equal(image[..., 0], image[..., 1])
                                        and np.array_equal(image[..., 0], image[..., 2])):
            colour_file = file
        images.append(image)
    if colour_file is None:
        images = [image[..., :1] for image in images]
    elif channels == 1:
        raise UserError(f'data.channels is 1 but {source.path} contains colour images (for example '
                        f'{colour_file}); set data.channels to 3 or convert the images to grayscale')
    if any(image.dtype != np.uint8 for image in images):
        images = [image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
                  for image in images]
    return np.stack([crop_and_resize(image, size) for image in images])


def crop_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop (H, W, C) to a square and resize it to (size, size, C) with bilinear filtering.

    uint8 images are resized as Pillow 'L'/'RGB' images and rounded to uint8, as torchvision's
    Resize does on PIL images. Float images are resized channel by channel in Pillow's mode 'F'.
    Pillow's bilinear filter widens with the scale factor when shrinking (antialiasing).
    """
    height, width = image.shape[:2]
    side = min(height, width)
    top = int(round((height - side) / 2.0))
    left = int(round((width - side) / 2.0))
    image = image[top:top + side, left:left + side]
    if side == size:
        return image
    if image.dtype == np.uint8:
        mode = 'L' if image.shape[-1] == 1 else 'RGB'
        picture = Image.fromarray(image[..., 0] if mode == 'L' else image, mode=mode)
        resized = np.asarray(picture.resize((size, size), Image.BILINEAR))
        return resized.reshape(size, size, -1)
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode='F')
                         .resize((size, size), Image.BILINEAR)) for c in range(image.shape[-1])]
    return np.stack(planes, axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Epoch order


class EpochOrder:
    """The order in which training steps visit the images: a new permutation every epoch.

    Epoch e uses the permutation drawn with fold_in(key, e). An epoch has count // batch_size
    steps, so every batch has the same shape. The last count % batch_size images of each
    permutation are skipped, which is a different subset every epoch. Step s (0-based) reads batch
    s mod steps_per_epoch of epoch s // steps_per_epoch, so the order depends only on the key and
    the step number.
    """

    def __init__(self, key, count: int, batch_size: int):
        self.check_sizes(count, batch_size)
        self.key = key
        self.count = count
        self.batch_size = batch_size
        self.steps_per_epoch = count // batch_size
        self._cached_epoch = None
        self._permutation = None

    @staticmethod
    def check_sizes(count: int, batch_size: int):
        if count < batch_size:
            raise UserError(f'the training set has {count} images, fewer than '
                            f'training.batch_size {batch_size}; lower the batch size')

    def position(self, step: int) -> tuple[int, int]:
        """Return (epoch, batch index within the epoch) of 0-based step `step`."""
        return divmod(int(step), self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, batch = self.position(step)
        if epoch != self._cached_epoch:
            self._permutation = np.asarray(
                jax.random.permutation(jax.random.fold_in(self.key, epoch), self.count))
            self._cached_epoch = epoch
        return self._permutation[batch * self.batch_size:(batch + 1) * self.batch_size]


# ---------------------------------------------------------------------------------------------
# Augmentation (runs inside the jitted training step)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The official NCSNv2 data flags: horizontal flips and dequantization."""

    random_flip: bool = False
    uniform_dequantization: bool = False
    gaussian_dequantization: bool = False

    @classmethod
    def from_config(cls, data_config) -> 'Augmentation':
        return cls(random_flip=data_config.random_flip,
                   uniform_dequantization=data_config.uniform_dequantization,
                   gaussian_dequantization=data_config.gaussian_dequantization)

    def __call__(self, key, x):
        """Apply the flags to a batch (N, H, W, C) in [0, 1].

        Flip: each image mirrored left-right with probability 1/2. Uniform dequantization:
        x <- (255 x + U[0, 1)) / 256. Gaussian dequantization: x <- x + N(0, 0.01^2). The order is
        that of the official code: the flip happens in the data set, dequantization afterwards.
        """
        flip_key, uniform_key, gaussian_key = jax.random.split(key, 3)
        if self.random_flip:
            flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(flip, x[:, :, ::-1, :], x)
        if self.uniform_dequantization:
            x = x / 256.0 * 255.0 + jax.random.uniform(uniform_key, x.shape, x.dtype) / 256.0
        if self.gaussian_dequantization:
            x = x + jax.random.normal(gaussian_key, x.shape, x.dtype) * GAUSSIAN_DEQUANTIZATION_STD
        return x
