"""Small test models: Hugging Face architectures from config classes (random
weights, nothing downloaded) and synthetic networks with hand-known residual
structure. Each builder returns `ModelCase` with the module, example inputs and
the residual counts a correct analysis must report.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DETECTION_CASES",
    "EXACT_NORM_CASES",
    "HF_CASES",
    "SYNTHETIC_CASES",
    "ModelCase",
    "build",
    "cached_onnx",
    "export_onnx",
]


@dataclasses.dataclass
class ModelCase:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    sites: int  # residual sites a correct analysis reports
    projection: int = 0  # of which projection shortcuts
    streams: int = 1
    norm: str | None = None  # "pre" / "post" / "none" for every site, when uniform
    exporters: tuple[str, ...] = ("dynamo",)
    stream_lengths: tuple[int, ...] | None = None  # sites per stream, in stream order, when known
    dynamic_shapes: dict | None = None  # dims kept dynamic (torch.export form) by the dynamo ONNX export


def _seed() -> None:
    torch.manual_seed(0)


def gpt2(layers: int = 2, seq: int = 8, width: int = 32, eps: float = 1e-5) -> ModelCase:
    import transformers as T

    _seed()
    cfg = T.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=2,
        vocab_size=101,
        n_positions=64,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        layer_norm_epsilon=eps,
    )
    model = T.GPT2Model(cfg).eval()
    ids = torch.randint(0, 101, (2, seq))
    return ModelCase("gpt2", model, (), {"input_ids": ids}, sites=2 * layers, norm="pre")


def bert(layers: int = 2, seq: int = 8) -> ModelCase:
    import transformers as T

    _seed()
    cfg = T.BertConfig(
        num_hidden_layers=layers,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=101,
        max_position_embeddings=64,
    )
    model = T.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 101, (2, seq))
    mask = torch.ones(2, seq, dtype=torch.int64)
    return ModelCase(
        "bert",
        model,
        (),
        {"input_ids": ids, "attention_mask": mask},
        sites=2 * layers,
        norm="post",
        exporters=("dynamo", "legacy"),
    )


def llama(layers: int = 2, seq: int = 8, eps: float = 1e-6) -> ModelCase:
    import transformers as T

    _seed()
    cfg = T.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=101,
        max_position_embeddings=64,
        use_cache=False,
        rms_norm_eps=eps,
    )
    model = T.LlamaModel(cfg).eval()
    ids = torch.randint(0, 101, (2, seq))
    return ModelCase("llama", model, (), {"input_ids": ids}, sites=2 * layers, norm="pre")


def vit(layers: int = 2, eps: float = 1e-12) -> ModelCase:
    import transformers as T

    _seed()
    cfg = T.ViTConfig(
        num_hidden_layers=layers,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_channels=3,
        layer_norm_eps=eps,
    )
    model = T.ViTModel(cfg, add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, 16, 16)
    return ModelCase(
        "vit",
        model,
        (),
        {"pixel_values": pixels},
        sites=2 * layers,
        norm="pre",
        exporters=("dynamo", "legacy"),
    )


def resnet50_layout() -> ModelCase:
    """HF ResNet with ResNet-50's layout (bottlenecks, depths 3-4-6-3), narrow widths."""
    import transformers as T

    _seed()
    cfg = T.ResNetConfig(
        embedding_size=8,
        hidden_sizes=[16, 32, 64, 128],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
        num_channels=3,
    )
    model = T.ResNetModel(cfg).eval()
    pixels = torch.randn(1, 3, 32, 32)
    return ModelCase(
        "resnet50",
        model,
        (),
        {"pixel_values": pixels},
        sites=16,
        projection=4,
        streams=4,
        norm="none",
        exporters=("dynamo", "legacy"),
        stream_lengths=(3, 4, 6, 3),
    )


class ResidualMLP(nn.Module):
    """x -> [x + W2 relu(W1 LN(x))] * blocks; pre-norm, one stream."""

    def __init__(self, blocks: int = 3, width: int = 16, norm: bool = True) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) if norm else nn.Identity() for _ in range(blocks))
        self.fc1 = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            x = x + fc2(torch.relu(fc1(norm(x))))
        return self.head(x)


class PostNormMLP(nn.Module):
    """x -> [LN(x + W2 relu(W1 x))] * blocks; post-norm, one stream."""

    def __init__(self, blocks: int = 3, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))

    def forward(self, x):
        for fc1, fc2, norm in zip(self.fc1, self.fc2, self.norms):
            x = norm(x + fc2(torch.relu(fc1(x))))
        return x


class ActivationBranchMLP(nn.Module):
    """x + relu(W x): the branch ends in an activation, so a factor on it cannot be folded."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class PlainMLP(nn.Module):
    """No residuals, but adds of every harmless kind: bias, x + f(x) without weights."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.bias = nn.Parameter(torch.randn(width))

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h + h * h  # add of two functions of h: no weighted op between
        h = self.fc2(h) + self.bias
        return h


class MaskedAttentionStack(nn.Module):
    """Two pre-norm attention layers sharing one additive mask built once from the
    input: `scores + mask` in layer 1 has the mask as an ancestor through layer 0's
    weighted ops, yet is not a residual. The mask has full [B, H, T, T] shape so that
    shape checks alone cannot reject it."""

    def __init__(self, width: int = 16, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x, keep):
        b, t, d = x.shape
        mask = (1.0 - keep[:, None, None, :].float()) * -1e4
        mask = mask.expand(b, self.heads, t, t)
        for norm, qkv, out in zip(self.norms, self.qkv, self.out):
            q, k, v = qkv(norm(x)).chunk(3, dim=-1)
            q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
            attn = torch.softmax(scores + mask, dim=-1) @ v
            x = x + out(attn.transpose(1, 2).reshape(b, t, d))
        return x


class ClassTokenBlock(nn.Module):
    """The skip of a real residual is a class token expanded from a parameter."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)

    def forward(self, x):
        cls = self.cls.expand(x.shape[0], -1, -1)
        k, v = self.kv(x).chunk(2, dim=-1)
        q = self.q(self.norm(cls))
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return cls + attn


class ClassAttentionStack(nn.Module):
    """CaiT's layout without timm: pre-norm blocks on the patch tokens, then class-attention blocks
    whose attention branch reads cat(x_cls, x) and adds to the class token, each followed by a pre-norm
    linear on the class token. Two streams: the patch tokens (`blocks` sites), the class token (2 per
    class block)."""

    def __init__(self, width: int = 16, blocks: int = 2, class_blocks: int = 2) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks + 2 * class_blocks))
        self.fc = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks + class_blocks))
        self.q = nn.ModuleList(nn.Linear(width, width) for _ in range(class_blocks))
        self.kv = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(class_blocks))
        self.blocks = blocks

    def forward(self, x):
        for i in range(self.blocks):
            x = x + self.fc[i](torch.relu(self.norms[i](x)))
        cls = self.cls.expand(x.shape[0], -1, -1)
        for j, (q, kv) in enumerate(zip(self.q, self.kv)):
            u = self.norms[self.blocks + 2 * j](torch.cat([cls, x], dim=1))
            k, v = kv(u).chunk(2, dim=-1)
            attn = torch.softmax(q(u[:, :1]) @ k.transpose(-1, -2), dim=-1) @ v
            cls = cls + attn
            cls = cls + self.fc[self.blocks + j](self.norms[self.blocks + 2 * j + 1](cls))
        return torch.cat([cls, x], dim=1)


class ResidualCNN(nn.Module):
    """Basic blocks: two identity shortcuts, then a strided block with a 1x1
    projection shortcut, then one more identity block; post-activation."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b1, self.b2 = block(c, c, 1), block(c, c, 1)
        self.b3 = block(c, 2 * c, 2)
        self.proj = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c))
        self.b4 = block(2 * c, 2 * c, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b1(x))
        x = torch.relu(x + self.b2(x))
        x = torch.relu(self.proj(x) + self.b3(x))
        return torch.relu(x + self.b4(x))


class PreActCNN(nn.Module):
    """Pre-activation residual CNN (ResNet v2 style): x + conv(relu(bn(conv(relu(bn(x)))))),
    a pure NCHW stream with the channel axis 1."""

    def __init__(self, c: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return torch.relu(self.norm(x))


def preact_cnn() -> ModelCase:
    _seed()
    model = PreActCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return ModelCase(
        "preact_cnn",
        model,
        (torch.randn(2, 3, 8, 8),),
        {},
        sites=3,
        norm="pre",
        exporters=("dynamo", "legacy"),
    )


def residual_mlp() -> ModelCase:
    _seed()
    return ModelCase(
        "residual_mlp",
        ResidualMLP().eval(),
        (torch.randn(2, 5, 16),),
        {},
        sites=3,
        norm="pre",
        exporters=("dynamo", "legacy"),
    )


def plain_mlp() -> ModelCase:
    _seed()
    return ModelCase(
        "plain_mlp",
        PlainMLP().eval(),
        (torch.randn(2, 16),),
        {},
        sites=0,
        streams=0,
        exporters=("dynamo", "legacy"),
    )


def masked_attention() -> ModelCase:
    _seed()
    keep = torch.ones(2, 6, dtype=torch.int64)
    keep[1, 4:] = 0
    return ModelCase(
        "masked_attention",
        MaskedAttentionStack().eval(),
        (torch.randn(2, 6, 16), keep),
        {},
        sites=2,
        norm="pre",
        exporters=("dynamo", "legacy"),
    )


def class_token() -> ModelCase:
    _seed()
    return ModelCase(
        "class_token",
        ClassTokenBlock().eval(),
        (torch.randn(2, 5, 16),),
        {},
        sites=1,
        norm="pre",
        exporters=("dynamo", "legacy"),
    )


def class_attention() -> ModelCase:
    _seed()
    return ModelCase(
        "class_attention",
        ClassAttentionStack().eval(),
        (torch.randn(2, 5, 16),),
        {},
        sites=6,
        streams=2,
        norm="pre",
        exporters=("dynamo", "legacy"),
        stream_lengths=(2, 4),
    )


def residual_cnn() -> ModelCase:
    _seed()
    return ModelCase(
        "residual_cnn",
        ResidualCNN().eval(),
        (torch.randn(1, 3, 16, 16),),
        {},
        sites=4,
        projection=1,
        streams=2,
        norm="none",
        exporters=("dynamo", "legacy"),
        stream_lengths=(2, 2),
    )


class CroppedTokens(nn.Module):
    """Pre-norm blocks whose branch pads the tokens, rolls them, reshapes with sizes read from the
    input and crops `h[:, 1:t + 1]` back, as Swin's shifted-window attention does on its map. Captured
    or exported with dynamic dims, the crop ends and reshape sizes are symbolic values computed from
    the input's shape: they carry no data, and the residual must still be found."""

    def __init__(self, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.fc = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x):
        for norm, fc in zip(self.norms, self.fc):
            b, t, c = x.shape
            h = torch.roll(nn.functional.pad(norm(x), (0, 0, 1, 1)), 1, 1)
            h = fc(h.view(b, -1, 2, c // 2).reshape(b, t + 2, c))
            x = x + h[:, 1 : t + 1]
        return x


def cropped_tokens() -> ModelCase:
    _seed()
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")}}
    return ModelCase(
        "cropped_tokens",
        CroppedTokens().eval(),
        (torch.randn(2, 5, 8),),
        {},
        sites=2,
        norm="pre",
        stream_lengths=(2,),
        dynamic_shapes=dims,
    )


# ----- torchvision / timm models (random weights, small configs; tests skip without the packages) -----


def tv_swin() -> ModelCase:
    """torchvision's Swin (Swin-T's blocks: shifted windows with pad, roll, window partition and merge
    inside the attention branch), two stages of two blocks at width 16. 40x40 images give 10x10 and 5x5
    maps, so windows of 4 need padding in both stages and both stages shift. Patch merging (a linear)
    ends the first stream. The batch dim is dynamic: the window partition then reshapes with a symbolic
    batch size, which hid the attention sites from the torch path."""
    from torchvision.models.swin_transformer import SwinTransformer

    _seed()
    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=10,
    ).eval()
    return ModelCase(
        "tv_swin",
        model,
        (torch.randn(2, 3, 40, 40),),
        {},
        sites=8,
        streams=2,
        norm="pre",
        stream_lengths=(4, 4),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )


def hf_swin() -> ModelCase:
    """Hugging Face's Swin (same blocks as torchvision's, different code), two stages of two blocks."""
    import transformers as T

    _seed()
    cfg = T.SwinConfig(
        image_size=40,
        patch_size=4,
        num_channels=3,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=4,
        mlp_ratio=2.0,
    )
    model = T.SwinModel(cfg, add_pooling_layer=False).eval()
    return ModelCase(
        "hf_swin",
        model,
        (),
        {"pixel_values": torch.randn(1, 3, 40, 40)},
        sites=8,
        streams=2,
        norm="pre",
        stream_lengths=(4, 4),
    )


def cait() -> ModelCase:
    """timm's CaiT: 4 self-attention blocks on the patch tokens, then 2 class-attention blocks whose
    attention branch reads cat(x_cls, x) and whose skip is the class token: 8 + 4 sites on two streams."""
    from timm.models.cait import Cait

    _seed()
    model = Cait(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, depth_token_only=2, num_classes=10
    ).eval()
    return ModelCase(
        "cait",
        model,
        (torch.randn(1, 3, 32, 32),),
        {},
        sites=12,
        streams=2,
        norm="pre",
        stream_lengths=(8, 4),
    )


def tv_resnet18() -> ModelCase:
    """torchvision ResNet-18: stage 1 keeps the stem's width (identity sites only), stages 2-4 start
    with a strided projection shortcut: four streams of two."""
    from torchvision.models import resnet18

    _seed()
    return ModelCase(
        "tv_resnet18",
        resnet18(num_classes=10).eval(),
        (torch.randn(1, 3, 32, 32),),
        {},
        sites=8,
        projection=3,
        streams=4,
        norm="none",
        stream_lengths=(2, 2, 2, 2),
    )


def tv_resnet50() -> ModelCase:
    """torchvision ResNet-50 (full width, 32x32 images): every stage starts with a projection shortcut."""
    from torchvision.models import resnet50

    _seed()
    return ModelCase(
        "tv_resnet50",
        resnet50(num_classes=10).eval(),
        (torch.randn(1, 3, 32, 32),),
        {},
        sites=16,
        projection=4,
        streams=4,
        norm="none",
        stream_lengths=(3, 4, 6, 3),
    )


def tv_regnet() -> ModelCase:
    """torchvision RegNet-Y (squeeze-excitation inside the branch) at a small width: each stage starts
    with a strided projection shortcut."""
    from torchvision.models.regnet import BlockParams, RegNet

    _seed()
    params = BlockParams.from_init_params(depth=7, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    depths = tuple(params.depths)
    model = RegNet(params, num_classes=10, stem_width=8).eval()
    return ModelCase(
        "tv_regnet",
        model,
        (torch.randn(1, 3, 32, 32),),
        {},
        sites=sum(depths),
        projection=len(depths),
        streams=len(depths),
        norm="none",
        stream_lengths=depths,
    )


def _exact_norm(builder: Callable[..., ModelCase], name: str) -> Callable[[], ModelCase]:
    """The same model with norm eps = 0, so norms are exactly scale-invariant (for the
    compensate options of decay/depth passes, whose proofs rely on N(c x) = N(x))."""

    def make() -> ModelCase:
        case = builder(eps=0.0)
        case.name = name
        return case

    return make


EXACT_NORM_CASES: dict[str, Callable[[], ModelCase]] = {
    "gpt2_eps0": _exact_norm(gpt2, "gpt2_eps0"),
    "llama_eps0": _exact_norm(llama, "llama_eps0"),
    "vit_eps0": _exact_norm(vit, "vit_eps0"),
}

HF_CASES: dict[str, Callable[[], ModelCase]] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "vit": vit,
    "resnet50": resnet50_layout,
}
SYNTHETIC_CASES: dict[str, Callable[[], ModelCase]] = {
    "residual_mlp": residual_mlp,
    "plain_mlp": plain_mlp,
    "masked_attention": masked_attention,
    "class_token": class_token,
    "residual_cnn": residual_cnn,
    "preact_cnn": preact_cnn,
    "class_attention": class_attention,
}


# Detection on real architectures beyond HF_CASES; torchvision and timm ones need those packages.
DETECTION_CASES: dict[str, Callable[[], ModelCase]] = {
    "tv_swin": tv_swin,
    "hf_swin": hf_swin,
    "cait": cait,
    "tv_resnet18": tv_resnet18,
    "tv_resnet50": tv_resnet50,
    "tv_regnet": tv_regnet,
    "cropped_tokens": cropped_tokens,
}


def build(name: str) -> ModelCase:
    return {**HF_CASES, **SYNTHETIC_CASES, **EXACT_NORM_CASES, **DETECTION_CASES}[name]()


def export_onnx(
    case: ModelCase, path: str | os.PathLike, *, exporter: str = "dynamo", opset: int = 18
) -> Path:
    """Export `case` to ONNX with one of torch.onnx's exporters ("dynamo" or "legacy")."""
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(case.kwargs) or [f"input_{i}" for i in range(len(case.args))]
    args = case.args + tuple(case.kwargs.values())
    module = case.module
    if case.kwargs:
        module = _KwargsAdapter(case.module, list(case.kwargs))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=names,
                verbose=False,
                dynamic_shapes=case.dynamic_shapes,
            )
        elif exporter == "legacy":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    return path


class _KwargsAdapter(nn.Module):
    """Positional-to-keyword adapter so exporters see plain tensor inputs and a
    plain tensor output (HF models take keywords and return dict-like outputs)."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *args):
        out = self.module(**dict(zip(self.names, args)))
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        return out


def cached_onnx(name: str, exporter: str = "dynamo", cache_dir: str | os.PathLike | None = None) -> Path:
    """Export once per cache folder (tests in several processes share it)."""
    cache = Path(cache_dir or os.environ.get("RESCOMPILE_MODEL_CACHE", ".cache/models"))
    path = cache / f"{name}-{exporter}.onnx"
    if not path.exists():
        tmp = cache / f".{name}-{exporter}-{os.getpid()}"
        export_onnx(build(name), tmp / path.name, exporter=exporter)
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".onnx"):  # data file first
            os.replace(f, cache / f.name)
        tmp.rmdir()
    return path
