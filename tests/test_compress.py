"""compress(), its report, fuse_sequential_chains() and to_sequential_model()."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from tucker_ops import _ops
from tucker_ops.compress import CompressionReport, compress, fuse_sequential_chains, to_sequential_model
from tucker_ops.models import ThesisNet, thesis_ranks
from tucker_ops.modules import TuckerConv2d, TuckerLinear

NET_AFTER = """ThesisNet(
  (conv1): Sequential(
    (0): Conv2d(1, 2, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2), bias=False)
    (1): Conv2d(2, 16, kernel_size=(1, 1), stride=(1, 1))
  )
  (conv2): Sequential(
    (0): Conv2d(16, 8, kernel_size=(1, 1), stride=(1, 1), bias=False)
    (1): Conv2d(8, 4, kernel_size=(5, 5), stride=(1, 1), bias=False)
    (2): Conv2d(4, 32, kernel_size=(1, 1), stride=(1, 1))
  )
  (pool): AvgPool2d(kernel_size=2, stride=2, padding=0)
  (dropout1): Dropout(p=0.2, inplace=False)
  (dropout2): Dropout2d(p=0.2, inplace=False)
  (l1): Sequential(
    (0): Linear(in_features=800, out_features=40, bias=False)
    (1): Linear(in_features=40, out_features=200, bias=False)
    (2): Linear(in_features=200, out_features=120, bias=True)
  )
  (l2): Sequential(
    (0): Linear(in_features=120, out_features=30, bias=False)
    (1): Linear(in_features=30, out_features=84, bias=True)
  )
  (l_out): Linear(in_features=84, out_features=10, bias=True)
)"""


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def thesis():
    torch.manual_seed(0)
    net = ThesisNet().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*r_out=200 exceeds")
        model, report = compress(net, ranks=thesis_ranks(), example_input=torch.randn(1, 1, 28, 28))
    return net, model, report


def test_thesis_compress_gives_the_slides_net_after(thesis):
    net, model, report = thesis
    assert isinstance(model.conv1, TuckerConv2d) and isinstance(model.l2, TuckerLinear)
    assert isinstance(net.conv1, nn.Conv2d), "inplace=False must leave the original alone"
    assert repr(to_sequential_model(model)) == NET_AFTER
    assert _params(net) == report.params_before == 120_382
    assert _params(model) == report.params_after == 72_360
    assert [(r.name, r.ranks, r.method, r.skipped) for r in report.layers] == [
        ("conv1", (None, 2), "explicit", None),
        ("conv2", (8, 4), "explicit", None),
        ("l1", (40, 200), "explicit", None),
        ("l2", (None, 30), "explicit", None),
        ("l_out", None, None, "no ranks given"),
    ]


def test_thesis_compressed_outputs_agree_across_paths(thesis):
    _, model, _ = thesis
    x = torch.randn(8, 1, 28, 28)
    sequential = to_sequential_model(model)
    with torch.no_grad():
        y = model(x)
        with _ops.use_reference():
            y_ref = model(x)
        y_seq = sequential(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y_seq, rtol=1e-4, atol=1e-5)


def test_thesis_macs_at_example_input(thesis):
    _, _, report = thesis
    # Dense: 28·28·16·25 + 10·10·32·16·25 + 800·120 + 120·84 + 84·10.
    assert report.macs_before == 313_600 + 1_280_000 + 96_000 + 10_080 + 840
    # conv1: 28·28·2·25 + 28·28·2·16; conv2: 14·14·16·8 + 10·10·8·4·25 + 10·10·4·32;
    # l1: 800·40 + 40·200 + 200·120; l2: 120·30 + 30·84; l_out dense.
    assert report["conv1"].macs_after == 39_200 + 25_088
    assert report["conv2"].macs_after == 25_088 + 80_000 + 12_800
    assert report.macs_after == 64_288 + 117_888 + 64_000 + 6_120 + 840
    assert report["conv2"].in_shape == (1, 16, 14, 14) and report["conv2"].out_shape == (1, 32, 10, 10)
    assert report.example_input_shape == (1, 1, 28, 28)


def test_report_str_and_json(thesis):
    _, _, report = thesis
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["layer", "type", "weight", "ranks", "method"]
    for name in ("conv1", "conv2", "l1", "l2", "l_out"):
        assert any(line.startswith(name + " ") for line in lines)
    assert "no ranks given" in text and "120,382 -> 72,360" in text and "1,700,520 -> 253,136" in text
    # Aligned: text columns start where their headers start, number columns end where theirs end.
    for header in ("type", "weight", "ranks", "method"):
        col = lines[0].index(header)
        for row in lines[2:7]:
            assert row[col - 2 : col] == "  " and row[col] != " ", (header, row)
    for header in ("params", "MACs", "rel. err"):
        end = lines[0].index(header) + len(header)
        for row in lines[2:7]:
            assert row[end - 1] != " " and row[end : end + 2] == "  ", (header, row)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["params_after"] == 72_360 and data["layers"][2]["ranks"] == [40, 200]
    assert data["layers"][4]["skipped"] == "no ranks given" and data["layers"][4]["compressed"] is False
    assert data["compression_ratio"] == pytest.approx(120_382 / 72_360)


def test_compress_with_vbmf_and_with_ratio():
    torch.manual_seed(0)
    net = ThesisNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained weights: EVBMF falls back to min_rank, with warnings
        model, report = compress(net, method="vbmf", min_rank=2)
    assert _params(model) == report.params_after < report.params_before
    for layer in report.layers:
        assert layer.skipped is None and layer.method == "vbmf"
        assert all(r is None or r >= 2 for r in layer.ranks)
        assert layer.params_after < layer.params_before
    model, report = compress(net, ranks=0.25)
    for layer in report.compressed:
        module = model.get_submodule(layer.name)
        assert module.ranks == layer.ranks and layer.method == "ratio"
        bias = module.bias.numel()
        assert layer.params_after - bias <= 0.25 * (layer.params_before - bias)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# -- a small ResNet-style model ----------------------------------------------------


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        x = torch.relu(self.grouped(x))
        return self.fc(x.mean(dim=(2, 3)))


LAYERS = ["stem.0", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.down.0", "grouped", "fc"]


def _resnet():
    torch.manual_seed(0)
    model = SmallResNet().double()
    model(torch.randn(4, 3, 16, 16, dtype=torch.float64))  # give BatchNorm non-trivial statistics
    return model.eval()


def test_resnet_full_rank_compress_keeps_the_function():
    model = _resnet()
    full = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            full[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            full[name] = (m.in_features, m.out_features)
    compressed, report = compress(model, ranks=full)
    assert [r.name for r in report.layers] == LAYERS
    assert report["grouped"].skipped == "groups=4 not supported"
    assert isinstance(compressed.grouped, nn.Conv2d)
    assert isinstance(compressed.layer2.down[0], TuckerConv2d) and compressed.layer2.down[0].stride == (2, 2)
    assert compressed.layer2.conv1.stride == (2, 2) and compressed.layer2.conv1.padding == (1, 1)
    for r in report.compressed:
        assert r.reconstruction_error < 1e-10
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(compressed(x), model(x), rtol=1e-9, atol=1e-10)


def test_resnet_ratio_with_example_input_measures_and_leaves_model_state_alone():
    model = _resnet().train()
    stats = model.layer1.bn1.running_mean.clone()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    compressed, report = compress(model, ranks=0.5, example_input=x)
    assert torch.equal(model.layer1.bn1.running_mean, stats), "measuring must not update BatchNorm"
    assert all(m.training for m in model.modules()) and all(m.training for m in compressed.modules())
    assert report["grouped"].skipped == "groups=4 not supported"
    assert report["grouped"].macs_before == 2 * 32 * 8 * 8 * (32 // 4) * 9 == report["grouped"].macs_after
    assert report["layer2.down.0"].macs_before == 2 * 32 * 8 * 8 * 16
    assert report["layer2.conv1"].in_shape == (2, 16, 16, 16) and report["layer2.conv1"].out_shape == (2, 32, 8, 8)
    assert report.macs_before == sum(r.macs_before for r in report.layers)
    assert report.macs_after == sum(r.macs_after for r in report.layers) < report.macs_before
    assert report.params_after == _params(compressed)
    for r in report.layers:
        module = compressed.get_submodule(r.name)
        if r.compressed:
            assert isinstance(module, (TuckerConv2d, TuckerLinear)) and module.ranks == r.ranks
            assert r.macs_after == module.macs(r.in_shape)
        else:
            assert r.params_after == r.params_before
    assert compressed.eval()(x).shape == (2, 10)


def test_include_and_exclude_patterns():
    model = _resnet()
    _, report = compress(model, ranks=0.5, include=["layer*"], exclude=["*.down*", "layer1.conv2"])
    reasons = {r.name: r.skipped for r in report.layers}
    assert reasons == {
        "stem.0": "not included",
        "layer1.conv1": None,
        "layer1.conv2": "excluded",
        "layer2.conv1": None,
        "layer2.conv2": None,
        "layer2.down.0": "excluded",
        "grouped": "not included",
        "fc": "not included",
    }
    # A pattern naming a container covers everything inside it.
    _, report = compress(model, ranks=0.5, exclude="layer2")
    assert {r.name for r in report.layers if r.skipped == "excluded"} == {"layer2.conv1", "layer2.conv2", "layer2.down.0"}
    with pytest.warns(UserWarning, match="include pattern 'nothing.here' matches no layer"):
        compress(model, ranks=0.5, include=["nothing.here"])


def test_ranks_dict_must_name_layers():
    with pytest.raises(ValueError, match=r"not Conv2d/Linear layers of the model: \['conv3'\]"):
        compress(ThesisNet(), ranks={"conv3": (2, 2)})
    with pytest.raises(ValueError, match="not Conv2d/Linear"):
        compress(ThesisNet(), ranks={"pool": (2, 2)})


def test_inplace():
    net = ThesisNet()
    out, _ = compress(net, ranks={"l2": (None, 10)}, inplace=True)
    assert out is net and isinstance(net.l2, TuckerLinear)


def test_skip_reasons_for_small_and_unreducible_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Linear(1, 8), nn.ConvTranspose2d(4, 4, 3))
    _, report = compress(model, method="energy", energy=0.3, min_rank=2)
    assert report["0"].skipped.startswith("too small to gain (ranks (2, 2): 24 >= 20 params)")
    assert report["1"].skipped == "no rank reduction (ranks (None, None))"
    assert report["2"].skipped == "ConvTranspose2d not supported (only Conv2d and Linear)"
    # Explicit ranks are honoured even when they cost more.
    compressed, report = compress(model, ranks={"0": (2, 2)})
    assert report["0"].compressed and report["0"].params_after == 24
    assert isinstance(compressed[0], TuckerConv2d)


def test_suspicious_padding_is_skipped_with_the_ops_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1, padding=2), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1, padding=2, padding_mode="reflect"))
    compressed, report = compress(model, ranks=(2, 2))
    assert report["0"].skipped.startswith("suspicious padding rejected by the ops: padding along H must be at most")
    assert "= 1" in report["0"].skipped and "got padding 2" in report["0"].skipped
    assert type(compressed[0]) is nn.Conv2d
    # The rule only concerns zero padding handed to the op.
    assert report["1"].compressed and report["2"].compressed
    assert compressed(torch.randn(1, 4, 5, 5)).shape == (1, 8, 13, 13)


def test_progress_bar_counts_parameters_and_names_the_layer(capsys):
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 10))
    compress(model, ranks=(None, 3), progress=True)
    err = capsys.readouterr().err
    assert "0 (30x20)" in err and "1 (10x30)" in err
    assert "940/940" in err  # 630 + 310 parameters (weights and biases)


def test_dense_layers_are_freed_as_they_are_replaced():
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40))
    seen = []
    real = compress.__globals__["_compress_layer"]

    def spy(report, layer, *args):
        seen.append(weakref.ref(layer))
        gc.collect()
        # The previous layer's dense copy is gone by the time the next one starts.
        assert all(ref() is None for ref in seen[:-1])
        return real(report, layer, *args)

    compress.__globals__["_compress_layer"] = spy
    try:
        compress(model, ranks=(None, 4))
    finally:
        compress.__globals__["_compress_layer"] = real
    assert len(seen) == 2


def test_already_compressed_layers_are_reported_and_counted(thesis):
    _, once, _ = thesis
    _, report = compress(once, ranks=0.5, example_input=torch.randn(1, 1, 28, 28))
    assert report["conv2"].skipped == "already a Tucker layer" and report["conv2"].ranks == (8, 4)
    assert report["conv2"].macs_before == 117_888
    assert report["l_out"].compressed


def test_shared_modules_stay_shared_and_odd_places_are_skipped():
    shared = nn.Linear(16, 16)
    model = nn.ModuleDict({"a": nn.Sequential(shared, nn.ReLU()), "b": nn.Sequential(shared), "attn": nn.MultiheadAttention(16, 2)})
    compressed, report = compress(model, ranks={"a.0": (None, 4), "attn.out_proj": (None, 4)})
    assert isinstance(compressed["a"][0], TuckerLinear) and compressed["a"][0] is compressed["b"][0]
    assert report["attn.out_proj"].skipped == "inside MultiheadAttention, which reads its weight directly"


def test_uninitialized_lazy_layers_are_skipped():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.Flatten(), nn.LazyLinear(4))
    _, report = compress(model, ranks=0.5)
    assert [r.skipped for r in report.layers] == ["uninitialized lazy layer (run a forward pass first)"] * 2
    model(torch.randn(1, 3, 6, 6))
    compressed, report = compress(model, ranks=0.5)
    assert all(r.compressed for r in report.layers) and isinstance(compressed[2], TuckerLinear)


def test_model_that_is_one_layer():
    model, report = compress(nn.Linear(20, 30), ranks=(None, 5))
    assert isinstance(model, TuckerLinear) and report[""].ranks == (None, 5)


def test_report_type():
    _, report = compress(nn.Sequential(nn.Linear(20, 30)), ranks=(None, 5))
    assert isinstance(report, CompressionReport)
    with pytest.raises(KeyError, match="no layer named 'x'"):
        report["x"]


# -- fuse_sequential_chains / to_sequential_model ----------------------------------------


class WithChains(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.Conv2d(2, 8, 1)),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 3, 3, stride=2, bias=False), nn.Conv2d(3, 8, 1)),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),  # not a chain
        )
        self.head = nn.Sequential(nn.Linear(8, 5, bias=False), nn.Linear(5, 4))
        self.plain = nn.Linear(4, 2)

    def forward(self, x):
        return self.plain(self.head(self.features(x).mean(dim=(2, 3))))


def test_fuse_sequential_chains_keeps_the_function():
    torch.manual_seed(0)
    model = WithChains().double()
    fused, names = fuse_sequential_chains(model)
    assert names == ["features.0", "features.2", "head"]
    assert isinstance(fused.features[0], TuckerConv2d) and fused.features[0].ranks == (None, 2)
    assert isinstance(fused.features[2], TuckerConv2d) and fused.features[2].ranks == (4, 3)
    assert isinstance(fused.features[3], nn.Sequential) and isinstance(fused.head, TuckerLinear)
    assert isinstance(model.head, nn.Sequential), "inplace=False must leave the original alone"
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12)
    with _ops.use_reference():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12)
    back = to_sequential_model(fused)
    assert repr(back) == repr(model)
    torch.testing.assert_close(back(x), model(x), rtol=1e-10, atol=1e-12)


def test_fuse_the_thesis_net_after(thesis):
    _, model, _ = thesis
    chains = to_sequential_model(model)
    fused, names = fuse_sequential_chains(chains, inplace=True)
    assert fused is chains and names == ["conv1", "conv2", "l1", "l2"]
    assert [fused.get_submodule(n).ranks for n in names] == [(None, 2), (8, 4), (40, 200), (None, 30)]
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


def test_fuse_root_chain_and_shared_chain():
    chain = nn.Sequential(nn.Linear(6, 3, bias=False), nn.Linear(3, 4))
    fused, names = fuse_sequential_chains(chain)
    assert isinstance(fused, TuckerLinear) and names == [""]
    holder = nn.ModuleDict({"a": chain, "b": chain})
    fused, names = fuse_sequential_chains(holder)
    assert names == ["a"] and fused["a"] is fused["b"] and isinstance(fused["b"], TuckerLinear)
