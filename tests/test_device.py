"""Device independence: checkpoints from flattened (cuDNN-style) weights, --device choices."""
import pytest
import torch
from safetensors import safe_open

from seq2seq import checkpoint, device
from seq2seq.errors import UserError
from conftest import small_charlm, small_translator


def flatten_like_cudnn(rnn: torch.nn.RNNBase) -> torch.Tensor:
    """Make every weight of `rnn` a view into one flat buffer, as cuDNN keeps them on a GPU."""
    params = list(rnn.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


@pytest.mark.parametrize("make", [small_translator, small_charlm])
def test_weights_sharing_one_buffer_save_and_load(make, tmp_path):
    model = make(seed=1)
    for rnn in [m for m in model.modules() if isinstance(m, torch.nn.RNNBase)]:
        flatten_like_cudnn(rnn)
    checkpoint.save_weights(model, tmp_path / "w.safetensors")
    fresh = make(seed=2)
    checkpoint.load_weights(fresh, tmp_path / "w.safetensors")
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "embed.weight" in names and "out.weight" not in names  # the tied output layer is stored once
    assert fresh.out.weight is fresh.embed.weight  # and stays tied after loading


def test_fp16_weights_load_into_an_fp32_model(tmp_path):
    model = small_translator(seed=3)
    checkpoint.save_weights(model.half(), tmp_path / "w.safetensors")
    fresh = small_translator(seed=4)
    checkpoint.load_weights(fresh, tmp_path / "w.safetensors")
    assert fresh.embed.weight.dtype == torch.float32
    assert torch.equal(fresh.embed.weight, model.embed.weight.float())


def test_device_choices():
    assert device.resolve("cpu") == torch.device("cpu")
    assert device.resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            device.resolve("cuda")
    with pytest.raises(UserError, match="--device must be one of"):
        device.resolve("tpu")
