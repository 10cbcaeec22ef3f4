"""Weights in and out: our safetensors format, OpenFlamingo checkpoint key checks, safe loading."""

import pickle

import pytest
import torch
from tiny_models import images, make_backbones

import flamingo
from flamingo.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def model():
    return flamingo.load_model("tiny-random")


def test_save_and_load_round_trip(model, tmp_path):
    with torch.no_grad():
        model.perceiver.frame_embs.normal_()   # a non-default value must survive too
    model.save_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.pt")) and not list((tmp_path / "m").glob("*.bin"))
    loaded = flamingo.load_model(str(tmp_path / "m"))
    lang_x, _ = model.tokenize(["<image>a red<|endofchunk|><image>a"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(vision_x=images(1, 2, frames=2), lang_x=lang_x).logits,
                                   model(vision_x=images(1, 2, frames=2), lang_x=lang_x).logits, atol=0, rtol=0)
        model.perceiver.frame_embs.zero_()
    assert loaded.config == model.config.__class__.load(tmp_path / "m" / "config.json")
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == model.media_token_id


def _openflamingo_style_state(model):
    """What OpenFlamingo saves: trainable parameters under its names, with its alias for the blocks."""
    state = {}
    for name, p in model.named_parameters():
        if name.startswith("perceiver.") and name != "perceiver.frame_embs":
            state[name] = p.detach().clone()
        elif ".gated_cross_attn_layer." in name:
            index, rest = name.split(".layers.")[1].split(".gated_cross_attn_layer.")
            state[f"lang_encoder.gated_cross_attn_layers.{index}.{rest}"] = p.detach().clone()
    state["lang_encoder.model.embed_tokens.weight"] = model.lang_encoder.get_input_embeddings().weight.detach().clone()
    # OpenFlamingo trains whole embedding matrices; an untied LM's output layer may come along.
    state["lang_encoder.lm_head.weight"] = model.lang_encoder.get_output_embeddings().weight.detach().clone()
    return state


def test_openflamingo_checkpoint_file_loads(model, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(_openflamingo_style_state(model), path)
    fresh = flamingo.from_preset("tiny-random", seed=123)
    fresh.load_openflamingo_checkpoint(str(path))
    for name, p in model.named_parameters():
        if p.requires_grad and name != "perceiver.frame_embs":
            torch.testing.assert_close(dict(fresh.named_parameters())[name], p, atol=0, rtol=0, msg=name)


def test_missing_and_unexpected_keys_are_named(model):
    state = _openflamingo_style_state(model)
    dropped = "perceiver.layers.0.0.to_q.weight"
    del state[dropped]
    state["lang_encoder.some_new_thing.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        model.load_openflamingo_checkpoint(state)
    assert dropped in str(error.value) and "lang_encoder.some_new_thing.weight" in str(error.value)
    state = _openflamingo_style_state(model)
    state["perceiver.latents"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"perceiver\.latents.*\(3, 3\)"):
        model.load_openflamingo_checkpoint(state)


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        pickle.dump({"perceiver.latents": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(path)
    assert "this ran" not in capsys.readouterr().out


def test_hub_ids_go_through_huggingface_hub(monkeypatch, tmp_path):
    """No hub here: with the hub offline, a repo id must fail inside huggingface_hub, not as a bad path."""
    import huggingface_hub.errors

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises((huggingface_hub.errors.LocalEntryNotFoundError, huggingface_hub.errors.OfflineModeIsEnabled)):
        read_checkpoint("openflamingo/OpenFlamingo-3B-vitl-mpt1b")


def test_create_model_and_transforms_matches_openflamingo_signature(tmp_path):
    clip, lm, tokenizer = make_backbones("llama")
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "tok")
    model, image_processor, tok = flamingo.create_model_and_transforms(
        "ViT-S-32", None, str(tmp_path / "lm"), str(tmp_path / "tok"), cross_attn_every_n_layers=2)
    from PIL import Image
    pixels = image_processor(Image.new("RGB", (300, 200), "red"))
    assert pixels.shape == (3, 224, 224)
    assert tok is model.tokenizer and model.config.vis_dim == 384
    assert len(model.gated_cross_attn_layers()) == 2
    lang_x, _ = model.tokenize(["<image>a"])
    out = model.generate(vision_x=pixels[None, None, None], lang_x=lang_x, max_new_tokens=3)
    assert out.shape[1] > lang_x.shape[1]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny-random"):
        flamingo.load_model("no-such-model")


def test_remote_code_presets_need_an_explicit_opt_in():
    with pytest.raises(ValueError, match="trust_remote_code"):
        flamingo.from_preset("openflamingo-3b")
