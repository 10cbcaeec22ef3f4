"""Model folders and configs from someone else: no code of theirs runs without the caller's consent, and
sizes are checked before anything is allocated."""

import json
import resource
import time
from pathlib import Path

import pytest
import torch
from tiny_models import images

import flamingo
from flamingo.backbones import build_tokenizer
from flamingo.builder import build
from flamingo.presets import TINY_LM, from_name

EVIL_CODE = """
open({marker!r}, "w").write("ran")
from transformers import PreTrainedTokenizerFast, LlamaForCausalLM


class EvilTokenizer(PreTrainedTokenizerFast):
    pass


class EvilLM(LlamaForCausalLM):
    pass
"""


@pytest.fixture(scope="module")
def original():
    return flamingo.load_model("tiny-random")


@pytest.fixture
def saved(original, tmp_path):
    folder = tmp_path / "model"
    original.save_pretrained(folder)
    return folder


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return data


def _plant_code(folder, tmp_path):
    """A Python file in the folder whose import leaves a marker, as a hostile model folder would carry."""
    marker = tmp_path / "code-ran"
    (folder / "tokenizer" / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return marker


def test_untouched_folder_loads_with_the_same_logits(original, saved):
    loaded = flamingo.load_model(str(saved))
    lang_x, _ = original.tokenize(["<image>a red<|endofchunk|><image>a"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(vision_x=images(1, 2), lang_x=lang_x).logits,
                                   original(vision_x=images(1, 2), lang_x=lang_x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("config_says_trust", [True, False])
@pytest.mark.parametrize("tokenizer_class", [True, False])
def test_folder_asking_to_run_its_tokenizer_code_is_refused(saved, tmp_path, config_says_trust, tokenizer_class):
    marker = _plant_code(saved, tmp_path)
    tokenizer_config = saved / "tokenizer" / "tokenizer_config.json"
    data = _edit_json(tokenizer_config, auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    if not tokenizer_class:       # without a class of its own, transformers would take the auto_map's
        data.pop("tokenizer_class")
        tokenizer_config.write_text(json.dumps(data))
    _edit_json(saved / "config.json", trust_remote_code=config_says_trust)

    with pytest.raises(flamingo.UntrustedCodeError) as error:
        flamingo.load_model(str(saved))
    message = str(error.value)
    assert str(saved) in message and "trust_remote_code=True" in message and "auto_map" in message
    assert ("config.json sets trust_remote_code" in message) == config_says_trust
    assert not marker.exists()


def test_transformers_refuses_the_code_too_when_asked_without_trust(saved, tmp_path):
    """The second line of defence: every call into transformers says trust_remote_code=False explicitly."""
    marker = _plant_code(saved, tmp_path)
    tokenizer_config = saved / "tokenizer" / "tokenizer_config.json"
    data = _edit_json(tokenizer_config, auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    data.pop("tokenizer_class")
    tokenizer_config.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_tokenizer(str(saved / "tokenizer"), trust_remote_code=False)
    assert not marker.exists()


def test_folder_whose_lm_config_has_an_auto_map_is_refused(saved, tmp_path):
    marker = _plant_code(saved, tmp_path)
    config = json.loads((saved / "config.json").read_text())
    config["lang_encoder_config"].update(auto_map={"AutoModelForCausalLM": "evil.EvilLM"},
                                         _name_or_path=str(saved / "tokenizer"))
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(flamingo.UntrustedCodeError, match="lang_encoder_config in config.json has an auto_map"):
        flamingo.load_model(str(saved))
    assert not marker.exists()


def test_the_callers_flag_is_what_allows_code(saved, tmp_path):
    marker = _plant_code(saved, tmp_path)
    _edit_json(saved / "tokenizer" / "tokenizer_config.json",
               auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    flamingo.load_model(str(saved), trust_remote_code=True)
    assert marker.exists()


def test_folder_without_its_lm_config_is_refused(saved):
    _edit_json(saved / "config.json", lang_encoder_config=None, lang_encoder=str(saved))
    with pytest.raises(ValueError, match="has no lang_encoder_config"):
        flamingo.load_model(str(saved))


def test_unknown_lm_model_type_is_a_clear_error(saved):
    config = json.loads((saved / "config.json").read_text())
    config["lang_encoder_config"]["model_type"] = "evil_lm"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'evil_lm', which transformers .* does not know") as error:
        flamingo.load_model(str(saved))
    assert len(str(error.value)) < 400      # not transformers' list of every architecture


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: kB


HUGE_LM = {**TINY_LM, "hidden_size": 32768, "intermediate_size": 4 * 32768, "num_hidden_layers": 64,
           "num_attention_heads": 256, "num_key_value_heads": 256, "vocab_size": 32000}


def test_huge_lm_in_a_saved_folder_is_refused_before_allocation(saved):
    config = json.loads((saved / "config.json").read_text())
    config["lang_encoder_config"].update({k: v for k, v in HUGE_LM.items() if k != "model_type"})
    (saved / "config.json").write_text(json.dumps(config))
    peak, start = _peak_rss_mb(), time.monotonic()
    with pytest.raises(flamingo.ModelTooLargeError) as error:
        flamingo.load_model(str(saved))
    assert time.monotonic() - start < 20
    assert _peak_rss_mb() - peak < 300
    message = str(error.value)
    assert str(saved) in message and "language model" in message and "nothing was allocated" in message
    assert "billion" not in message and "B parameters" in message and "max_bytes" in message


def test_huge_lm_in_a_config_is_refused_before_allocation():
    config = from_name("tiny-random")
    config.lang_encoder_config = HUGE_LM
    peak, start = _peak_rss_mb(), time.monotonic()
    with pytest.raises(flamingo.ModelTooLargeError, match=r"would need about [\d,.]+ GiB"):
        build(config)
    assert time.monotonic() - start < 20
    assert _peak_rss_mb() - peak < 300


def test_explicit_limit_counts_bridges_and_weights_file(saved):
    with pytest.raises(flamingo.ModelTooLargeError, match="limit \\(max_bytes\\)") as error:
        flamingo.load_model(str(saved), max_bytes=1000)
    assert "bridges" in str(error.value) and "model.safetensors" in str(error.value)
    with pytest.raises(flamingo.ModelTooLargeError, match="tiny-random"):
        flamingo.from_preset("tiny-random", max_bytes=1000)
    flamingo.load_model(str(saved), max_bytes=10**9)


def test_the_commands_refuse_a_hostile_folder_in_one_line(saved, tmp_path):
    from click.testing import CliRunner

    from flamingo_annotate.cli import main

    marker = _plant_code(saved, tmp_path)
    _edit_json(saved / "tokenizer" / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    _edit_json(saved / "config.json", trust_remote_code=True)
    result = CliRunner().invoke(main, ["eval", "--model", str(saved), "--scenes", "1", "--clips", "0",
                                       "--episodes", "1", "--shots", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "asks to run its own code" in result.output and "--trust-remote-code" in result.output
    assert not marker.exists()


def test_a_job_refuses_a_hostile_folder_before_any_worker_starts(saved, tmp_path):
    from click.testing import CliRunner

    from flamingo_annotate.cli import main

    marker = _plant_code(saved, tmp_path)
    _edit_json(saved / "tokenizer" / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    jobs = Path(__file__).resolve().parents[1] / "jobs"
    result = CliRunner().invoke(main, ["run", str(jobs / "tasks" / "count.yaml"), "--input", str(jobs / "sample"),
                                       "--output", str(tmp_path / "out"), "--model", str(saved)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "asks to run its own code" in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()    # refused before the output was touched
