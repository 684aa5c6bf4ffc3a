"""tucker_ops.save / tucker_ops.load: exact round trips, structural re-compression, clear errors, atomic writes."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch
from torch import nn

import tucker_ops
from tucker_ops import CheckpointError, TuckerConv2d, TuckerConv2dReLUPool, TuckerLinear, serialization


class Dense(nn.Module):
    """A model with the layer kinds the peer libraries trip over: no bias, dilation, padding='same', sharing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.block = nn.Sequential(
            nn.Conv2d(12, 16, 3, padding="same", dilation=2),
            nn.ReLU(),
            nn.Conv2d(16, 16, (3, 2), stride=2, padding=(1, 0), padding_mode="reflect"),
        )
        self.head = nn.Linear(16 * 4 * 4, 20, bias=False)
        self.out = nn.Linear(20, 5)
        self.alias = self.out  # the same module under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.block(x)
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.alias(torch.relu(self.head(x)))


RANKS = {"stem": (None, 4), "block.0": (6, 5), "block.2": (5, None), "head": (12, 6), "out": (None, 3)}


@pytest.fixture(scope="module")
def compressed() -> nn.Module:
    pytest.importorskip("tensorly", reason="compress decomposes with tensorly")
    torch.manual_seed(0)
    model, _ = tucker_ops.compress(Dense(), ranks=RANKS)
    model.block[0].backend = "reference"
    return model


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_into_fresh_dense_model_is_exact(compressed, tmp_path) -> None:
    path = tmp_path / "model.pt"
    tucker_ops.save(compressed, path)
    loaded = tucker_ops.load(path, model_factory=Dense)
    assert isinstance(loaded, Dense)
    for name in RANKS:
        got, want = loaded.get_submodule(name), compressed.get_submodule(name)
        assert type(got) is type(want) and got.ranks == want.ranks, name
    assert isinstance(loaded.block[0], TuckerConv2d) and loaded.block[0].padding == "same"
    assert loaded.block[0].backend == "reference"
    assert loaded.stem.bias is None and loaded.head.bias is None
    assert loaded.alias is loaded.out  # sharing survives
    assert loaded.block[2].reconstruction_error == compressed.block[2].reconstruction_error
    _same_state(compressed, loaded)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded.eval()(x), compressed.eval()(x))


def test_file_is_plain_data_readable_with_weights_only(compressed, tmp_path) -> None:
    path = tmp_path / "model.pt"
    tucker_ops.save(compressed, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "tucker_ops.checkpoint"
    assert raw["format_version"] == tucker_ops.CHECKPOINT_FORMAT_VERSION
    assert [e["name"] for e in raw["plan"]] == list(RANKS)
    entry = {e["name"]: e for e in raw["plan"]}["block.0"]
    assert entry["kind"] == "conv2d" and entry["ranks"] == [6, 5] and entry["dilation"] == [2, 2]


def test_load_without_factory_returns_checkpoint_to_restore_later(compressed, tmp_path) -> None:
    path = tmp_path / "model.pt"
    tucker_ops.save(compressed, path)
    ckpt = tucker_ops.load(path)
    assert isinstance(ckpt, tucker_ops.Checkpoint)
    assert ckpt.metadata["model_class"].endswith("Dense")
    target = Dense()
    restored = ckpt.restore(target)  # an instance is re-compressed in place
    assert restored is target
    _same_state(compressed, restored)


def test_plan_helpers_and_idempotent_restore_on_compressed_model(compressed) -> None:
    plan = tucker_ops.compression_plan(compressed)
    again = tucker_ops.apply_compression_plan(Dense(), plan)
    assert tucker_ops.compression_plan(again) == plan
    # A plan applied to an already compressed model rebuilds the same structure.
    twice = tucker_ops.apply_compression_plan(again, plan)
    assert [e["ranks"] for e in tucker_ops.compression_plan(twice)] == [e["ranks"] for e in plan]


def test_single_layer_model_and_dtype_and_dense_model(tmp_path) -> None:
    layer = TuckerLinear(9, 7, (3, None), dtype=torch.float64)
    tucker_ops.save(layer, tmp_path / "layer.pt")
    loaded = tucker_ops.load(tmp_path / "layer.pt", lambda: nn.Linear(9, 7, dtype=torch.float64))
    assert isinstance(loaded, TuckerLinear) and loaded.ranks == (3, None)
    _same_state(layer, loaded)
    dense = nn.Sequential(nn.Linear(4, 3))
    tucker_ops.save(dense, tmp_path / "dense.pt")
    _same_state(dense, tucker_ops.load(tmp_path / "dense.pt", lambda: nn.Sequential(nn.Linear(4, 3))))


def test_newer_format_version_is_refused(compressed, tmp_path) -> None:
    path = tmp_path / "new.pt"
    payload = torch.load(_saved(compressed, tmp_path), weights_only=True)
    payload["format_version"] = tucker_ops.CHECKPOINT_FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"newer tucker_ops.*format version 2.*up to 1"):
        tucker_ops.load(path, Dense)


def _saved(model: nn.Module, tmp_path) -> str:
    path = str(tmp_path / "saved.pt")
    tucker_ops.save(model, path)
    return path


@pytest.mark.parametrize("keep", [0, 10, 0.5, 0.95])
def test_truncated_file_raises_clear_error(compressed, tmp_path, keep) -> None:
    data = open(_saved(compressed, tmp_path), "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="not a readable checkpoint|not a tucker_ops checkpoint"):
        tucker_ops.load(cut, Dense)


def test_foreign_files_raise_clear_errors(tmp_path) -> None:
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a tucker_ops checkpoint"):
        tucker_ops.load(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        tucker_ops.load(tmp_path / "missing.pt")


def test_plan_not_fitting_the_model_raises_naming_the_layer(compressed, tmp_path) -> None:
    path = _saved(compressed, tmp_path)

    class Renamed(Dense):
        def __init__(self) -> None:
            super().__init__()
            self.stem2 = self.stem
            del self.stem

    with pytest.raises(CheckpointError, match=r"layer 'stem'.*does not have"):
        tucker_ops.load(path, Renamed)

    class Wider(Dense):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 13, 3, padding=1, bias=False)

    with pytest.raises(CheckpointError, match=r"layer 'stem' expected out_channels 12.*has 13"):
        tucker_ops.load(path, Wider)

    class Kind(Dense):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(256, 20, 1, bias=False)

    with pytest.raises(CheckpointError, match=r"layer 'head' expected a layer of type 'nn.Linear'.*'Conv2d'"):
        tucker_ops.load(path, Kind)

    class Padded(Dense):
        def __init__(self) -> None:
            super().__init__()
            self.block[0] = nn.Conv2d(12, 16, 3, padding=2, dilation=2)

    with pytest.raises(CheckpointError, match=r"layer 'block.0' expected padding 'same'"):
        tucker_ops.load(path, Padded)

    class Extra(Dense):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match=r"(?s)state_dict does not fit.*extra.weight"):
        tucker_ops.load(path, Extra)
    with pytest.raises(TypeError, match="model_factory must return an nn.Module"):
        tucker_ops.load(path, lambda: 3)


def test_interrupted_save_keeps_previous_file(compressed, tmp_path, monkeypatch) -> None:
    path = tmp_path / "model.pt"
    tucker_ops.save(compressed, path)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial checkpoint bytes")  # the start of a zip, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        tucker_ops.save(nn.Linear(3, 3), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # the temp file is cleaned up
    _same_state(compressed, tucker_ops.load(path, Dense))


def test_interrupt_during_rename_keeps_previous_file(compressed, tmp_path, monkeypatch) -> None:
    path = tmp_path / "model.pt"
    tucker_ops.save(compressed, path)
    before = path.read_bytes()

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(serialization.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        tucker_ops.save(nn.Linear(3, 3), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_save_replaces_and_respects_umask(compressed, tmp_path) -> None:
    path = tmp_path / "model.pt"
    tucker_ops.save(nn.Linear(2, 2), path)
    tucker_ops.save(compressed, path)
    assert zipfile.is_zipfile(path)
    _same_state(compressed, tucker_ops.load(path, Dense))
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_compress_runs_with_bias_none_dilation_and_same_padding() -> None:
    """The layer kinds peer libraries crash on: full ranks make the decomposition exact, so outputs match."""
    pytest.importorskip("tensorly", reason="compress decomposes with tensorly")
    torch.manual_seed(0)
    dense = Dense().double().eval()
    full = {"stem": (None, 12), "block.0": (12, 16), "block.2": (16, 16), "head": (20, 20), "out": (5, 5)}
    model, report = tucker_ops.compress(dense, ranks=full)
    assert len(report.compressed) == 5
    assert model.stem.bias is None and model.block[0].padding == "same" and model.block[0].dilation == (2, 2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-9, atol=1e-10)


# -- fused epilogues ------------------------------------------------------------------


class Pooled(nn.Module):
    """conv -> ReLU -> AvgPool2d(2) and conv -> ReLU: fuse_epilogues fuses both (pools 2 and 1)."""

    def __init__(self, relu: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), relu(), nn.AvgPool2d(2), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class Untraceable(Pooled):
    """fx cannot trace the whole model (control flow on a value), only ``features``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x).flatten(1)
        return self.head(y) if y.sum() > 0 else -self.head(y)


POOLED_RANKS = {"features.0": (2, 4), "features.3": (4, 3), "head": (5, 3)}
FUSED = {"features.0": 2, "features.3": 1}


def _pools(model: nn.Module) -> dict[str, int]:
    return {name: m.pool for name, m in model.named_modules() if isinstance(m, TuckerConv2dReLUPool)}


def _compressed(cls: type[nn.Module]) -> nn.Module:
    pytest.importorskip("tensorly", reason="compress decomposes with tensorly")
    torch.manual_seed(0)
    model, _ = tucker_ops.compress(cls().double(), ranks=POOLED_RANKS)
    return model.eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_fused_epilogues_are_fused_again_on_load(tmp_path) -> None:
    fused = tucker_ops.fuse_epilogues(_compressed(Pooled))
    assert _pools(fused) == FUSED
    path = tmp_path / "fused.pt"
    tucker_ops.save(fused, path)
    assert {e["name"]: e.get("epilogue_pool") for e in tucker_ops.load(path).plan} == {**FUSED, "head": None}
    loaded = tucker_ops.load(path, lambda: Pooled().double())
    assert _pools(loaded) == FUSED
    _same_state(loaded, fused)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), fused(_x()))


def test_fused_submodule_of_an_untraceable_model(tmp_path) -> None:
    model = _compressed(Untraceable)
    model.features = tucker_ops.fuse_epilogues(model.features)  # as fuse_epilogues' error advises
    path = tmp_path / "fused.pt"
    tucker_ops.save(model, path)
    loaded = tucker_ops.load(path, lambda: Untraceable().double())
    assert type(loaded) is Untraceable and _pools(loaded) == FUSED
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


def test_a_fused_layer_saved_alone(tmp_path) -> None:
    layer = TuckerConv2dReLUPool(3, 6, 3, (2, 4), padding=1, pool=2, dtype=torch.float64)
    path = tmp_path / "layer.pt"
    tucker_ops.save(layer, path)
    loaded = tucker_ops.load(path, lambda: nn.Conv2d(3, 6, 3, padding=1).double())
    assert type(loaded) is TuckerConv2dReLUPool and loaded.pool == 2
    with torch.no_grad():
        assert torch.equal(loaded(_x()), layer(_x()))


def test_a_missing_epilogue_pattern_loads_unfused_with_a_warning(tmp_path) -> None:
    fused = tucker_ops.fuse_epilogues(_compressed(Pooled))
    path = tmp_path / "fused.pt"
    tucker_ops.save(fused, path)
    # The factory's first conv no longer feeds a ReLU: that layer cannot be fused again.
    with pytest.warns(RuntimeWarning, match=r"\['features\.0'\] were saved fused"):
        loaded = tucker_ops.load(path, lambda: Pooled(relu=nn.Identity).double())
    assert _pools(loaded) == {"features.3": 1}
    _same_state(loaded, fused)


@pytest.mark.parametrize("pool", [0, True, "2", 1.5])
def test_a_malformed_epilogue_pool_is_a_checkpoint_error(pool) -> None:
    plan = serialization.compression_plan(TuckerConv2dReLUPool(3, 6, 3, (2, 4), pool=2))
    plan[0]["epilogue_pool"] = pool
    with pytest.raises(CheckpointError, match="malformed epilogue_pool"):
        serialization.apply_compression_plan(nn.Conv2d(3, 6, 3), plan)
