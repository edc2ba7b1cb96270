"""Checkpoint conversion HF <-> megatron-core: bitwise round trips through every TP x PP, logits parity with
transformers, vocabulary expansion, and located errors for bad inputs.

Real parts only: a random-weight transformers LlamaForCausalLM (GQA, Llama-3 RoPE scaling, Meta's Llama-3
tokenizer), megatron-core models on gloo under torchrun, the training loop's checkpoint loader and saver.
One 4-process launch does every multi-process check; this file is also that launch's worker script.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cslm.errors import CslmError
from tests.helpers.hf import load_hf_tensors, make_hf_llama, rewrite_tensor

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
NOTICES = {"LICENSE": "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT (test copy)\n",
           "USE_POLICY.md": "# Llama 3.1 Acceptable Use Policy (test copy)\n"}
# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory, llama3_tokenizer_path) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "hf", llama3_tokenizer_path)


@pytest.fixture(scope="module")
def work(tmp_path_factory, hf_tiny) -> Path:
    """Converted checkpoints + exports, and the results of the one 4-process megatron-core launch."""
    from megatron_cslm.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from tests.helpers.launch import torchrun

    work = tmp_path_factory.mktemp("convert")
    hf = Path(shutil.copytree(hf_tiny, work / "hf"))
    for name, text in NOTICES.items():  # what Meta's Llama 3.1 repository carries next to the weights
        (hf / name).write_text(text, encoding="utf-8")
    convert_hf_to_megatron(hf, work / "plain", tensor_parallel_size=2, pipeline_parallel_size=2, progress=False)
    convert_hf_to_megatron(hf, work / "expanded", tensor_parallel_size=2, pipeline_parallel_size=2,
                           expand_vocab=True, progress=False)
    convert_megatron_to_hf(work / "expanded", work / "hf_expanded", dtype="fp32", max_shard_bytes=20 * 2**20,
                           progress=False)
    shutil.copytree(hf, work / "hf_tampered")
    rewrite_tensor(work / "hf_tampered", "model.norm.weight", lambda t: t * 1.5)
    torchrun(Path(__file__).relative_to(ROOT), 4, "--worker", work, timeout=400)
    return work


@pytest.fixture(scope="module")
def results(work) -> dict:
    return json.loads((work / "results.json").read_text())


# ----------------------------------------------------------------------------------------------- layout

def test_qkv_layout_is_megatron_per_group_order():
    from megatron_cslm.convert.layout import fuse_qkv, split_qkv
    from megatron_cslm.models.llama import ARCHS

    arch = ARCHS["tiny"]  # 4 heads, 2 KV groups, head dim 16
    d, h = arch.head_dim, arch.hidden_size
    q, k, v = torch.randn(4 * d, h), torch.randn(2 * d, h), torch.randn(2 * d, h)
    qkv = fuse_qkv(q, k, v, arch)
    # group g: q heads 2g, 2g+1, then k_g, then v_g
    expected = torch.cat([q[0:2 * d], k[0:d], v[0:d], q[2 * d:4 * d], k[d:2 * d], v[d:2 * d]])
    assert torch.equal(qkv, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, arch), (q, k, v)))


def test_local_spec_saves_norms_under_te_names():
    """The layout writes TE's fused norm names; megatron-core's local spec must keep mapping onto them."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert keys_map == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


# ----------------------------------------------------------------------------------------------- round trips

@pytest.mark.timeout(600)
def test_bitwise_round_trip_through_every_parallel_layout(work, results, tmp_path):
    """HF -> megatron -> loaded and re-saved by megatron-core at TP x PP -> HF: every tensor bitwise equal."""
    from megatron_cslm.convert import convert_megatron_to_hf

    original = load_hf_tensors(work / "hf")
    direct = tmp_path / "direct"
    convert_megatron_to_hf(work / "plain", direct, dtype="fp32", progress=False)
    assert load_hf_tensors(direct).keys() == original.keys()
    for tp, pp in LAYOUTS:
        out = tmp_path / f"tp{tp}_pp{pp}"
        convert_megatron_to_hf(work / f"resaved_tp{tp}_pp{pp}", out, dtype="fp32", progress=False)
        exported = load_hf_tensors(out)
        assert exported.keys() == original.keys()
        unequal = [name for name, t in original.items() if not torch.equal(t, exported[name])]
        assert not unequal, f"TP={tp} PP={pp}: {unequal[:5]}"
    assert results["strict_load_tp2_pp2"] == "ok"  # no missing or unexpected keys for the real model


def test_tied_embeddings_round_trip(tmp_path, llama3_tokenizer_path):
    """Tied models (Llama-3.2 style) have no output layer in megatron-core; a stored lm_head copy is ignored."""
    from megatron_cslm.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_cslm.convert.dist_ckpt import DistCheckpointReader
    from megatron_cslm.convert.layout import OUTPUT

    hf = make_hf_llama(tmp_path / "hf", llama3_tokenizer_path, seed=1, tie_word_embeddings=True,
                       num_hidden_layers=2)
    convert_hf_to_megatron(hf, tmp_path / "run", progress=False)
    assert OUTPUT not in DistCheckpointReader(tmp_path / "run" / "iter_0000000").metadata.state_dict_metadata
    convert_megatron_to_hf(tmp_path / "run", tmp_path / "back", dtype="fp32", progress=False)
    original, exported = load_hf_tensors(hf), load_hf_tensors(tmp_path / "back")
    original.pop("lm_head.weight", None)
    assert exported.keys() == original.keys()
    assert all(torch.equal(t, exported[name]) for name, t in original.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is True


def test_dist_reader_reads_stored_bytes_directly(tmp_path):
    """Regions that cut across TP-split chunks come back exact from the direct `pread` path (DCP is not used:
    every record was located), and a truncated data file still fails through DCP with the checkpoint named."""
    from megatron_cslm.convert.dist_ckpt import DATA_FILE, DistCheckpointReader, DistCheckpointWriter

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, 5, generator=g).to(torch.bfloat16), torch.randn(3, 8, 4, generator=g)
    with DistCheckpointWriter(tmp_path / "c") as writer:
        for i in range(4):  # stacked layers: one chunk per layer
            writer.add_tensor("a", a[i:i + 1], a.shape, (i, 0, 0))
        writer.add_tensor("b", b[:, :4], b.shape, (0, 0, 0))  # TP-split rows
        writer.add_tensor("b", b[:, 4:], b.shape, (0, 4, 0))
        writer.finish({})
    reader = DistCheckpointReader(tmp_path / "c")
    got = reader.read({"a": ((1, 2, 1), (2, 3, 3)), "b": ((1, 2, 0), (2, 5, 4))})
    assert torch.equal(got["a"], a[1:3, 2:5, 1:4]) and torch.equal(got["b"], b[1:3, 2:7])
    assert torch.equal(reader.read_layer(["a"], 3)["a"], a[3])
    assert len(reader._raw_offsets) == 5 and None not in reader._raw_offsets.values()  # a: layers 1-3; b: both
    data = tmp_path / "c" / DATA_FILE
    data.write_bytes(data.read_bytes()[:-200])
    with pytest.raises(CslmError, match="unreadable tensor data"):
        DistCheckpointReader(tmp_path / "c").read({"b": ((0, 0, 0), (3, 8, 4))})


@pytest.mark.timeout(600)
def test_megatron_tp2_pp2_logits_match_transformers(results):
    verified = results["verify_plain"]
    assert verified["ok"], verified["table"]
    assert len(verified["rows"]) == 3
    assert max(r["max_abs"] for r in verified["rows"]) < 1e-4
    assert all(r["top1_agree"] == 1.0 for r in verified["rows"])


@pytest.mark.timeout(600)
def test_verify_reports_a_mismatch_with_a_table(results):
    tampered = results["verify_tampered"]
    assert not tampered["ok"]
    assert "MISMATCH" in tampered["table"] and "max|diff|" in tampered["table"]
    assert max(r["max_abs"] for r in tampered["rows"]) > 1e-2


# ----------------------------------------------------------------------------------------------- vocabulary

@pytest.mark.timeout(600)
def test_vocab_expansion(work, results, speech_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_cslm.checkpoint.manifest import ModelManifest
    from megatron_cslm.convert.dist_ckpt import DistCheckpointReader
    from megatron_cslm.convert.layout import EMBEDDING, OUTPUT

    base, vocab = speech_tokenizer.base_vocab_size, speech_tokenizer.vocab_size
    manifest = ModelManifest.load(work / "expanded")
    assert (manifest.arch.vocab_size, manifest.padded_vocab_size) == (vocab, 132608)  # 128 x TP=2 multiple

    # Megatron checkpoint: new rows finite, distinct, near the mean; padding rows zero.
    reader = DistCheckpointReader(work / "expanded" / "iter_0000000")
    for key in (EMBEDDING, OUTPUT):
        rows = reader.read({key: ((0, 0), (manifest.padded_vocab_size, 64))})[key]
        new, pad = rows[base:vocab], rows[vocab:]
        assert torch.isfinite(new).all() and new.std(0).min() > 0
        assert torch.allclose(new.mean(0), rows[:base].mean(0), atol=1e-3)
        assert pad.shape[0] == 132608 - vocab and not pad.any()

    # The HF export loads with stock transformers; original text logits are unchanged.
    original = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(work / "hf_expanded", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "hf_expanded")
    assert model.config.vocab_size == vocab and len(tokenizer) == vocab
    assert model.config.rope_scaling["original_max_position_embeddings"] == 256
    text = torch.tensor([speech_tokenizer.encode_text("Speech and text share one vocabulary.")])
    with torch.no_grad():
        before, after = original(text).logits, model(text).logits
    assert after.shape[-1] == vocab and torch.equal(before, after[..., :base])

    units = tokenizer("<sosp><12><4095><eosp>", add_special_tokens=False)["input_ids"]
    assert units == speech_tokenizer.encode_units([12, 4095])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "<sosp><7><eosp>"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert len(json.loads((work / "hf_expanded" / "model.safetensors.index.json").read_text())["weight_map"]) == 39

    # The megatron-core model at TP=2 x PP=2 agrees with the export, and with the original on text ids.
    assert results["verify_expanded"]["ok"], results["verify_expanded"]["table"]
    assert not results["verify_expanded"]["skipped"]
    against_original = results["verify_expanded_vs_original"]
    assert against_original["ok"] and against_original["vocab"] == base, against_original["table"]
    assert against_original["skipped"] == ["<sosp><12><345><678><9><eosp> What did the speaker say?"]


@pytest.mark.timeout(300)
def test_export_is_hub_ready(work, speech_tokenizer):
    """Licence files travel HF -> Megatron -> HF; the export has a model card, chat_template.jinja, the
    intended sampling and a vLLM-readable RoPE config, and still loads in stock transformers unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from megatron_cslm.checkpoint.manifest import ModelManifest
    from megatron_cslm.inference.sampling import SamplingConfig

    export, run = work / "hf_expanded", work / "expanded"
    for name, text in NOTICES.items():
        assert (run / name).read_text(encoding="utf-8") == text  # kept with the Megatron checkpoint
        assert (export / name).read_text(encoding="utf-8") == text
    manifest = ModelManifest.load(run)
    assert manifest.base_model == "hf" and manifest.lineage[0]["stage"] == "convert"

    card = (export / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nbase_model: hf\n")
    assert "[LICENSE](LICENSE), [USE_POLICY.md](USE_POLICY.md)" in card
    assert f"speech {speech_tokenizer.layout.describe()}" in card
    assert f"`<sosp>` = {speech_tokenizer.sosp_id}" in card and "top_p=0.7" in card
    assert "vocabulary expanded with 4096 speech units" in card

    config = json.loads((export / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    generation = GenerationConfig.from_pretrained(export)
    sampling = SamplingConfig()
    assert generation.do_sample and (generation.temperature, generation.top_p) == (sampling.temperature,
                                                                                   sampling.top_p)
    template = (export / "chat_template.jinja").read_text(encoding="utf-8")
    assert "chat_template" not in json.loads((export / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template == template and "<|start_header_id|>" in template

    original = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    text = tokenizer("Licence files travel with the weights.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(original(text).logits, model(text).logits[..., :speech_tokenizer.base_vocab_size])


# ----------------------------------------------------------------------------------------------- CLI

@pytest.mark.timeout(300)
def test_cli_converts_and_verifies(work, tmp_path):
    proc = subprocess.run(
        [sys.executable, "checkpoints_convert/hf_to_megatron.py", "--hf-dir", str(work / "hf"),
         "--out", str(tmp_path / "run"), "--tp", "1", "--pp", "1", "--verify"],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: max |diff|" in proc.stdout
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "0\n"
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()


# ----------------------------------------------------------------------------------------------- errors

@pytest.fixture()
def hf_copy(hf_tiny, tmp_path) -> Path:
    return Path(shutil.copytree(hf_tiny, tmp_path / "hf"))


def _convert(hf: Path, out: Path, **kwargs):
    from megatron_cslm.convert import convert_hf_to_megatron

    return convert_hf_to_megatron(hf, out, progress=False, **kwargs)


def test_error_non_llama_config(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, "model_type": "mistral",
                                                      "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"config.json: field 'model_type' is 'mistral'"):
        _convert(hf_copy, tmp_path / "out")


def test_error_missing_shard(hf_copy, tmp_path):
    shard = json.loads((hf_copy / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (hf_copy / shard).unlink()
    missing = rf"index.json: field 'weight_map' shard {shard} \(holding e.g. .*\) not found"
    with pytest.raises(ValueError, match=missing):
        _convert(hf_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_error_missing_tensor(hf_copy, tmp_path):
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"field 'model.layers.2.mlp.up_proj.weight' tensor missing"):
        _convert(hf_copy, tmp_path / "out")


def test_error_shape_does_not_match_config(hf_copy, tmp_path):
    rewrite_tensor(hf_copy, "model.layers.1.self_attn.k_proj.weight", lambda t: t[:16])
    with pytest.raises(ValueError, match=r"safetensors: field 'model.layers.1.self_attn.k_proj.weight' shape "
                                         r"\[16, 64\] does not match config.json, which implies \[32, 64\]"):
        _convert(hf_copy, tmp_path / "out")


def test_error_tokenizer_base_vocab_differs(hf_copy, tmp_path, work):
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, "vocab_size": 128000}))
    with pytest.raises(ValueError, match=r"config.json: field 'vocab_size' is 128000, but the base vocabulary of "
                                         r"the tokenizer in .* has 128256 ids"):
        _convert(hf_copy, tmp_path / "out", expand_vocab=True)
    with pytest.raises(ValueError, match=r"config.json: field 'vocab_size' is 128000, but the tokenizer"):
        _convert(hf_copy, tmp_path / "out")
    with pytest.raises(ValueError, match=r"already expanded"):  # an exported, already expanded model
        _convert(work / "hf_expanded", tmp_path / "out2", expand_vocab=True)


def test_error_tp_does_not_divide_heads(hf_tiny, tmp_path):
    with pytest.raises(ValueError, match=r"tensor-model-parallel-size 3 does not divide num_attention_heads 4"):
        _convert(hf_tiny, tmp_path / "out", tensor_parallel_size=3)


def test_error_existing_output_and_bad_megatron_inputs(work, tmp_path):
    from megatron_cslm.convert import convert_megatron_to_hf

    with pytest.raises(CslmError, match="already holds a checkpoint"):
        _convert(work / "hf", work / "plain")
    with pytest.raises(CslmError, match="latest_checkpointed_iteration.txt"):
        convert_megatron_to_hf(work / "hf", tmp_path / "x", progress=False)
    # A manifest that disagrees with the checkpoint's tensors (e.g. copied from another run).
    run = Path(shutil.copytree(work / "plain", tmp_path / "run"))
    manifest = json.loads((run / "cslm_model.json").read_text())
    manifest["arch"]["ffn_hidden_size"] = 128
    (run / "cslm_model.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"\.metadata: field 'decoder.layers.mlp.linear_fc1.weight' global shape "
                                         r"\[4, 352, 64\], but cslm_model.json implies \[4, 256, 64\]"):
        convert_megatron_to_hf(run, tmp_path / "y", progress=False)


# ----------------------------------------------------------------------------------------------- worker

def _worker(work: Path) -> None:
    """4 processes: load the converted checkpoint at every TP x PP with the training loop's loader, re-save it
    with megatron-core, and compare logits with transformers at TP=2 x PP=2."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_cslm.checkpoint.manifest import MANIFEST, ModelManifest
    from megatron_cslm.checkpoint.save_load import load_checkpoint, save_checkpoint
    from megatron_cslm.convert.verify import verify
    from megatron_cslm.distributed import parallel
    from megatron_cslm.models.chunks import build_model_chunks
    from megatron_cslm.models.llama import PrecisionConfig, transformer_config

    manifest = ModelManifest.load(work / "plain")
    results = {}
    for tp, pp in LAYOUTS:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel.initialize(parallel.ParallelConfig(tp, pp), device="cpu")
        config = transformer_config(manifest.arch, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                    precision=PrecisionConfig(dtype="fp32"))
        model = build_model_chunks(manifest.arch, config, manifest.padded_vocab_size)
        load_checkpoint(work / "plain", 0, model, None, None, restore_rng=False)
        run = work / f"resaved_tp{tp}_pp{pp}"
        save_checkpoint(run, 0, model, None, None, {"iteration": 0})
        if dist.get_rank() == 0:  # what the training loop keeps next to its checkpoints
            shutil.copyfile(work / "plain" / MANIFEST, run / MANIFEST)
            shutil.copytree(work / "plain" / "tokenizer", run / "tokenizer")
        if (tp, pp) == (2, 2):
            dist_checkpointing.load(model[0].sharded_state_dict(), str(work / "plain" / "iter_0000000"),
                                    strict=StrictHandling.RAISE_ALL)
            results["strict_load_tp2_pp2"] = "ok"
            for name, hf, run_dir in [("verify_plain", "hf", "plain"), ("verify_tampered", "hf_tampered", "plain"),
                                      ("verify_expanded", "hf_expanded", "expanded"),
                                      ("verify_expanded_vs_original", "hf", "expanded")]:
                r = verify(work / hf, work / run_dir, atol=1e-4)
                results[name] = {"ok": r.ok, "table": r.table(), "vocab": r.vocab, "skipped": r.skipped,
                                 "rows": [vars(row) for row in r.rows]}
    dist.barrier()
    if dist.get_rank() == 0:
        (work / "results.json").write_text(json.dumps(results, indent=1))
    parallel.destroy()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
