"""PyTorch port of NCSNv2, the PIDLD sampler and the NCSNv2 training loss, for tests and benchmarks.

The score networks use the module and parameter names of the official NCSNv2 code, so the state
dicts of official checkpoints load with `load_state_dict(strict=True)` once the `module.` prefix of
`torch.nn.DataParallel` is removed. The operations and their order follow the official float32
computation (see `tests/data/golden/` for the outputs it is checked against).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = ('NCSNv2', 'NCSNv2Deeper', 'NCSNv2Deepest')

RECORD_NAMES = (
    'grad_norms', 'e_int_norms', 'e_diff_norms',
    'P_term_norms', 'I_term_norms', 'D_term_norms',
    'IP_ratios', 'DP_ratios',
    'PID_term_norms', 'noise_term_norms', 'delta_term_norms',
    'snrs', 'image_norms',
)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

def conv3x3(in_planes, out_planes, bias=True, dilation=1):
    """Return a 3x3 convolution that keeps the spatial size (padding equals the dilation)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, padding=dilation, dilation=dilation,
                     bias=bias)


class InstanceNormPlus(nn.Module):
    """InstanceNorm++: instance norm plus the channel means, normalised across channels.

    The channel means are normalised with the unbiased variance over channels (`torch.var`
    default) plus 1e-5. The instance norm uses the biased variance and eps 1e-5, without affine
    parameters. `alpha` and `gamma` start at N(1, 0.02) and `beta` at zero, as in the official code.
    """

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        means = torch.mean(x, dim=(2, 3))
        m = torch.mean(means, dim=-1, keepdim=True)
        v = torch.var(means, dim=-1, keepdim=True)
        means = (means - m) / torch.sqrt(v + 1e-5)
        h = F.instance_norm(x, eps=1e-5)
        h = h + means[..., None, None] * self.alpha[..., None, None]
        return self.gamma.view(-1, self.num_features, 1, 1) * h + self.beta.view(-1, self.num_features, 1, 1)


class ConvMeanPool(nn.Module):
    """Convolution followed by the mean of the four 2x2-strided subsamples.

    With `adjust_padding` the input first gets one row of zeros on top and one column on the left,
    and the convolution sits at index 1 of an `nn.Sequential` (parameter names `conv.1.*`).
    """

    def __init__(self, in_planes, out_planes, kernel_size, adjust_padding=False):
        super().__init__()
        conv = nn.Conv2d(in_planes, out_planes, kernel_size, padding=kernel_size // 2)
        if adjust_padding:
            self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv)
        else:
            self.conv = conv

    def forward(self, x):
        h = self.conv(x)
        total = h[:, :, ::2, ::2] + h[:, :, 1::2, ::2] + h[:, :, ::2, 1::2] + h[:, :, 1::2, 1::2]
        return total / 4.0


class ResidualBlock(nn.Module):
    """Pre-activation residual block: norm1, ELU, conv1, norm2, ELU, conv2, plus a shortcut.

    `resample` is None or 'down'. A 'down' block with a dilation keeps the spatial size, and one
    without a dilation halves it with ConvMeanPool. `adjust_padding` only reaches ConvMeanPool, so
    it has no effect on a dilated block (the official NCSNv2 passes it to such a block at 28x28).
    Submodules are registered in the official order, which fixes the state dict key order.
    """

    def __init__(self, in_planes, out_planes, resample=None, dilation=None, adjust_padding=False):
        super().__init__()
        if resample not in (None, 'down'):
            raise ValueError(f"invalid resample {resample!r}; expected None or 'down'")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.resample = resample
        conv_dilation = dilation or 1

        if resample == 'down' and dilation is not None:
            self.conv1 = conv3x3(in_planes, in_planes, dilation=conv_dilation)
            self.normalize2 = InstanceNormPlus(in_planes)
            self.conv2 = conv3x3(in_planes, out_planes, dilation=conv_dilation)
            make_shortcut = lambda: conv3x3(in_planes, out_planes, dilation=conv_dilation)
        elif resample == 'down':
            self.conv1 = conv3x3(in_planes, in_planes)
            self.normalize2 = InstanceNormPlus(in_planes)
            self.conv2 = ConvMeanPool(in_planes, out_planes, 3, adjust_padding=adjust_padding)
            make_shortcut = lambda: ConvMeanPool(in_planes, out_planes, 1, adjust_padding=adjust_padding)
        elif dilation is not None:
            self.conv1 = conv3x3(in_planes, out_planes, dilation=conv_dilation)
            self.normalize2 = InstanceNormPlus(out_planes)
            self.conv2 = conv3x3(out_planes, out_planes, dilation=conv_dilation)
            make_shortcut = lambda: conv3x3(in_planes, out_planes, dilation=conv_dilation)
        else:
            self.conv1 = conv3x3(in_planes, out_planes)
            self.normalize2 = InstanceNormPlus(out_planes)
            self.conv2 = conv3x3(out_planes, out_planes)
            make_shortcut = lambda: nn.Conv2d(in_planes, out_planes, kernel_size=1)

        if self._has_shortcut_conv():
            self.shortcut = make_shortcut()
        self.normalize1 = InstanceNormPlus(in_planes)

    def _has_shortcut_conv(self):
        return self.out_planes != self.in_planes or self.resample is not None

    def forward(self, x):
        h = F.elu(self.normalize1(x))
        h = self.conv1(h)
        h = F.elu(self.normalize2(h))
        h = self.conv2(h)
        shortcut = self.shortcut(x) if self._has_shortcut_conv() else x
        return shortcut + h


class RCUBlock(nn.Module):
    """Residual conv unit: `n_blocks` times (ELU, bias-free 3x3 conv) x `n_stages`, plus the input."""

    def __init__(self, features, n_blocks, n_stages):
        super().__init__()
        self.n_blocks = n_blocks
        self.n_stages = n_stages
        for i in range(n_blocks):
            for j in range(n_stages):
                setattr(self, f'{i + 1}_{j + 1}_conv', conv3x3(features, features, bias=False))

    def forward(self, x):
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = getattr(self, f'{i + 1}_{j + 1}_conv')(F.elu(x))
            x = x + residual
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling: ELU, then stages of 5x5 max pool (stride 1) and a bias-free conv."""

    def __init__(self, features, n_stages):
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(features, features, bias=False) for _ in range(n_stages))

    def forward(self, x):
        x = F.elu(x)
        path = x
        for conv in self.convs:
            path = conv(F.max_pool2d(path, kernel_size=5, stride=1, padding=2))
            x = path + x
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: 3x3 convs (with bias) upsampled bilinearly (align_corners=True), summed."""

    def __init__(self, in_planes, features):
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(planes, features) for planes in in_planes)

    def forward(self, xs, shape):
        total = None
        for conv, x in zip(self.convs, xs):
            h = F.interpolate(conv(x), size=shape, mode='bilinear', align_corners=True)
            total = h if total is None else total + h
        return total


class RefineBlock(nn.Module):
    """RefineNet block: an RCU per input, fusion of several inputs, CRP, then an output RCU.

    A start block has one input and no fusion module. An end block's output RCU has 3 blocks
    instead of 1.
    """

    def __init__(self, in_planes, features, start=False, end=False):
        super().__init__()
        self.adapt_convs = nn.ModuleList(RCUBlock(planes, 2, 2) for planes in in_planes)
        self.output_convs = RCUBlock(features, 3 if end else 1, 2)
        if not start:
            self.msf = MSFBlock(in_planes, features)
        self.crp = CRPBlock(features, 2)

    def forward(self, xs, output_shape):
        hs = [rcu(x) for rcu, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, output_shape) if len(hs) > 1 else hs[0]
        return self.output_convs(self.crp(h))


# ---------------------------------------------------------------------------------------------
# Score networks
# ---------------------------------------------------------------------------------------------

def _residual_stage(in_planes, out_planes, dilation=None, adjust_padding=False):
    """Return a stage of a 'down' block followed by a plain block at the same dilation."""
    return nn.ModuleList([
        ResidualBlock(in_planes, out_planes, resample='down', dilation=dilation,
                      adjust_padding=adjust_padding),
        ResidualBlock(out_planes, out_planes, dilation=dilation),
    ])


class NCSNv2Net(nn.Module):
    """NCSNv2, NCSNv2Deeper or NCSNv2Deepest, unconditional apart from the final division by sigma.

    `forward(x, y)` takes images in [0, 1] (N, C, H, W) and integer noise-level labels (N,), and
    returns the score network output divided by `sigmas[y]`.
    """

    def __init__(self, architecture, ngf, channels, sigmas, image_size=None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f'unknown architecture {architecture!r}; expected one of {ARCHITECTURES}')
        self.architecture = architecture
        self.ngf = ngf
        self.channels = channels
        f = ngf  # the usual notation for the base channel count
        self.register_buffer('sigmas', torch.as_tensor(sigmas, dtype=torch.float32).clone())

        self.begin_conv = nn.Conv2d(channels, f, 3, padding=1)
        self.normalizer = InstanceNormPlus(f)
        self.end_conv = nn.Conv2d(f, channels, 3, padding=1)

        self.res1 = nn.ModuleList([ResidualBlock(f, f), ResidualBlock(f, f)])
        self.res2 = _residual_stage(f, 2 * f)
        if architecture == 'NCSNv2':
            self.res3 = _residual_stage(2 * f, 2 * f, dilation=2)
            # The official code passes adjust_padding=True here for 28x28 images, which changes
            # nothing because a dilated 'down' block has no ConvMeanPool.
            self.res4 = _residual_stage(2 * f, 2 * f, dilation=4, adjust_padding=image_size == 28)
            self.refine1 = RefineBlock([2 * f], 2 * f, start=True)
            self.refine2 = RefineBlock([2 * f, 2 * f], 2 * f)
            self.refine3 = RefineBlock([2 * f, 2 * f], f)
            self.refine4 = RefineBlock([f, f], f, end=True)
        else:
            self.res3 = _residual_stage(2 * f, 2 * f)
            if architecture == 'NCSNv2Deepest':
                self.res31 = _residual_stage(2 * f, 2 * f)
            self.res4 = _residual_stage(2 * f, 4 * f, dilation=2)
            self.res5 = _residual_stage(4 * f, 4 * f, dilation=4)
            self.refine1 = RefineBlock([4 * f], 4 * f, start=True)
            self.refine2 = RefineBlock([4 * f, 4 * f], 2 * f)
            self.refine3 = RefineBlock([2 * f, 2 * f], 2 * f)
            if architecture == 'NCSNv2Deepest':
                self.refine31 = RefineBlock([2 * f, 2 * f], 2 * f)
            self.refine4 = RefineBlock([2 * f, 2 * f], f)
            self.refine5 = RefineBlock([f, f], f, end=True)

    @staticmethod
    def _run_stage(stage, x):
        for block in stage:
            x = block(x)
        return x

    def _encode_decode(self, h):
        layer1 = self._run_stage(self.res1, h)
        layer2 = self._run_stage(self.res2, layer1)
        layer3 = self._run_stage(self.res3, layer2)
        if self.architecture == 'NCSNv2':
            layer4 = self._run_stage(self.res4, layer3)
            ref = self.refine1([layer4], layer4.shape[2:])
            ref = self.refine2([layer3, ref], layer3.shape[2:])
            ref = self.refine3([layer2, ref], layer2.shape[2:])
            return self.refine4([layer1, ref], layer1.shape[2:])

        deepest = self.architecture == 'NCSNv2Deepest'
        layer31 = self._run_stage(self.res31, layer3) if deepest else layer3
        layer4 = self._run_stage(self.res4, layer31)
        layer5 = self._run_stage(self.res5, layer4)
        ref = self.refine1([layer5], layer5.shape[2:])
        ref = self.refine2([layer4, ref], layer4.shape[2:])
        if deepest:
            ref = self.refine31([layer31, ref], layer31.shape[2:])
        ref = self.refine3([layer3, ref], layer3.shape[2:])
        ref = self.refine4([layer2, ref], layer2.shape[2:])
        return self.refine5([layer1, ref], layer1.shape[2:])

    def forward(self, x, y):
        h = self.begin_conv(2 * x - 1.0)
        h = self._encode_decode(h)
        h = self.end_conv(F.elu(self.normalizer(h)))
        used_sigmas = self.sigmas[y].view(x.shape[0], *([1] * (x.dim() - 1)))
        return h / used_sigmas


def build_model(architecture, ngf, channels, sigmas, image_size=None):
    """Build a randomly initialised score network with the official parameter names.

    `sigmas` is the noise ladder stored in the `sigmas` buffer (1-D, float32). `image_size` only
    matters for NCSNv2 at 28, where it sets the official `adjust_padding` flag (a no-op).
    """
    return NCSNv2Net(architecture, ngf, channels, sigmas, image_size=image_size)


def strip_module_prefix(state_dict):
    """Return the state dict with the `module.` prefix of `torch.nn.DataParallel` removed."""
    prefix = 'module.'
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def infer_architecture(state_dict):
    """Return (architecture, ngf, channels, num_classes) read from a stripped state dict."""
    missing = [k for k in ('begin_conv.weight', 'sigmas') if k not in state_dict]
    if missing:
        raise ValueError(f'not an NCSNv2 state dict: missing keys {missing}')
    if any(k.startswith('res31.') for k in state_dict):
        architecture = 'NCSNv2Deepest'
    elif any(k.startswith('res5.') for k in state_dict):
        architecture = 'NCSNv2Deeper'
    else:
        architecture = 'NCSNv2'
    ngf, channels = state_dict['begin_conv.weight'].shape[:2]
    return architecture, int(ngf), int(channels), int(state_dict['sigmas'].shape[0])


def load_official_checkpoint(path, ema=True):
    """Load an official NCSNv2 checkpoint into a new model in eval mode.

    The file is the list `[model_state, optimizer_state, epoch, step, ema_shadow]` written by the
    official training loop (the EMA shadow is absent when the run had no EMA). With `ema=True` the
    shadow is copied over the parameters, as the official EMA helper does. Returns
    `(model, meta)`, where `meta` contains architecture, ngf, channels, num_classes, epoch, step and
    whether the EMA weights were loaded.
    """
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, (list, tuple)) or len(checkpoint) < 4:
        raise ValueError(f'invalid checkpoint {path}: expected the list [model_state, '
                         'optimizer_state, epoch, step, ema_shadow] that the NCSNv2 training '
                         'loop writes')
    state = strip_module_prefix(checkpoint[0])
    architecture, ngf, channels, num_classes = infer_architecture(state)
    model = build_model(architecture, ngf, channels, state['sigmas'])
    model.load_state_dict(state, strict=True)

    if ema:
        if len(checkpoint) < 5:
            raise ValueError(f'{path} has no EMA shadow; load it with ema=False')
        shadow = checkpoint[4]
        params = dict(model.named_parameters())
        if set(shadow) != set(params):
            difference = sorted(set(shadow) ^ set(params))
            raise ValueError(f'{path}: EMA shadow names differ from the model parameters: {difference[:5]}')
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(shadow[name])

    model.eval()
    meta = {
        'architecture': architecture, 'ngf': ngf, 'channels': channels,
        'num_classes': num_classes, 'epoch': int(checkpoint[2]), 'step': int(checkpoint[3]),
        'ema': bool(ema),
    }
    return model, meta


# ---------------------------------------------------------------------------------------------
# Training loss
# ---------------------------------------------------------------------------------------------

def dsm_loss_torch(model, x, labels, z, sigmas, anneal_power=2):
    """Compute the NCSNv2 annealed denoising score matching loss for a given noise draw `z`.

    Per sample: 1/2 * sum over pixels of (score(x + sigma z, label) + z / sigma)^2 * sigma^anneal_power,
    then the mean over the batch. The operation order follows the official loss.
    """
    sigmas = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device)
    n = x.shape[0]
    used_sigmas = sigmas[labels].view(n, *([1] * (x.dim() - 1)))
    noise = z * used_sigmas
    perturbed = x + noise
    target = -1 / (used_sigmas ** 2) * noise
    scores = model(perturbed, labels)
    squared_error = ((scores.reshape(n, -1) - target.reshape(n, -1)) ** 2).sum(dim=-1)
    loss = 1 / 2.0 * squared_error * used_sigmas.reshape(n) ** anneal_power
    return loss.mean(dim=0)


# ---------------------------------------------------------------------------------------------
# PID-controlled annealed Langevin dynamics
# ---------------------------------------------------------------------------------------------

def _mean_sample_norm(t):
    """Return the mean over the batch of each sample's Frobenius norm, as a Python float."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=-1).mean().item()


def _ratio(numerator, denominator):
    # NOTE: the original recording hook raises ZeroDivisionError when the denominator is 0
    # (for example with k_p = 0), but this port records inf or nan instead.
    if denominator == 0.0:
        return float('nan') if numerator == 0.0 else float('inf')
    return numerator / denominator


def _evaluate_score(score_fn, x, labels, score_batch_size):
    if score_batch_size is None or score_batch_size >= x.shape[0]:
        return score_fn(x, labels)
    chunks = [score_fn(x[start:start + score_batch_size], labels[start:start + score_batch_size])
              for start in range(0, x.shape[0], score_batch_size)]
    return torch.cat(chunks, dim=0)


@torch.no_grad()
def pid_ald_torch(score_fn, x_init, sigmas, *, n_steps_each, step_lr, k_p=1.0, k_i=0.0, k_d=0.0,
                  k_i_decay=1.0, k_d_decay=1.0, denoise=True, noise=None, generator=None,
                  score_batch_size=None):
    """Run PID-controlled annealed Langevin dynamics (PIDLD) and record per-step statistics.

    `score_fn(x, labels)` is called with `labels` the index of the level in `sigmas`, so a score
    network's own sigma table must be this ladder. At level i, step size eps = step_lr * (sigma_i /
    sigma_L)^2, and each step does x += eps * (k_p g + k_i e_int + k_d e_diff) + sqrt(2 eps) xi,
    where g is the score, e_int the running mean of all scores so far (across levels, including
    g), and e_diff = g - g_prev (g_prev = 0 at the first step). After every step k_i and k_d are
    multiplied by their decays. `xi` is `noise[k]` at global step k when `noise` is given
    (shape (L * n_steps_each, *x.shape)), else `torch.randn` with `generator`. With `denoise`, the
    result is x + sigma_L^2 * score(x, L - 1). `score_batch_size` evaluates the score in chunks.

    Returns `(x_final, record)`, where `record` maps each name in RECORD_NAMES to a float64 array
    with one value per step. Norms are batch means of per-sample Frobenius norms, and ratios are
    ratios of those means. The denoising step is not recorded.
    """
    sigmas = np.asarray(sigmas.cpu() if torch.is_tensor(sigmas) else sigmas, dtype=np.float32)
    n_levels = len(sigmas)
    if noise is not None and noise.shape[0] < n_levels * n_steps_each:
        raise ValueError(f'noise has {noise.shape[0]} steps but the run needs '
                         f'{n_levels * n_steps_each} (levels x n_steps_each): pass one draw per step')

    x = x_init.clone()
    e_int = torch.zeros_like(x)
    score_prev = torch.zeros_like(x)
    record = {name: [] for name in RECORD_NAMES}
    global_step = 0

    for level in range(n_levels):
        # Both are numpy float32 scalars, as in the original sampler, which receives the sigmas as
        # a float32 numpy array (numpy >= 2 keeps float32 when multiplying by a Python float).
        step_size = step_lr * (sigmas[level] / sigmas[-1]) ** 2
        noise_scale = np.sqrt(step_size * 2)
        labels = torch.full((x.shape[0],), level, dtype=torch.long, device=x.device)

        for _ in range(n_steps_each):
            score = _evaluate_score(score_fn, x, labels, score_batch_size)
            e_int = (e_int * global_step + score) / (global_step + 1)
            e_diff = score - score_prev
            score_prev = score

            if noise is not None:
                xi = torch.as_tensor(noise[global_step], dtype=x.dtype, device=x.device)
            else:
                xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + step_size * (k_p * score + k_i * e_int + k_d * e_diff) + xi * noise_scale

            p_term = step_size * k_p * score
            i_term = step_size * k_i * e_int
            d_term = step_size * k_d * e_diff
            pid_term = p_term + i_term + d_term
            noise_term = xi * noise_scale
            norms = {
                'grad_norms': _mean_sample_norm(score),
                'e_int_norms': _mean_sample_norm(e_int),
                'e_diff_norms': _mean_sample_norm(e_diff),
                'P_term_norms': _mean_sample_norm(p_term),
                'I_term_norms': _mean_sample_norm(i_term),
                'D_term_norms': _mean_sample_norm(d_term),
                'PID_term_norms': _mean_sample_norm(pid_term),
                'noise_term_norms': _mean_sample_norm(noise_term),
                'delta_term_norms': _mean_sample_norm(pid_term + noise_term),
                'image_norms': _mean_sample_norm(x),
            }
            norms['IP_ratios'] = _ratio(norms['I_term_norms'], norms['P_term_norms'])
            norms['DP_ratios'] = _ratio(norms['D_term_norms'], norms['P_term_norms'])
            norms['snrs'] = _ratio(norms['PID_term_norms'], norms['noise_term_norms'])
            for name in RECORD_NAMES:
                record[name].append(norms[name])

            k_i = k_i * k_i_decay
            k_d = k_d * k_d_decay
            global_step += 1

    if denoise:
        labels = torch.full((x.shape[0],), n_levels - 1, dtype=torch.long, device=x.device)
        score = _evaluate_score(score_fn, x, labels, score_batch_size)
        x = x + sigmas[-1] ** 2 * score

    return x, {name: np.asarray(values, dtype=np.float64) for name, values in record.items()}
