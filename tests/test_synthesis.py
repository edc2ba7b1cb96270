"""Issue 25 part 2: units -> audio through CosyVoice's own flow-matching model and HiFT vocoder, streamed.

The modules come from the `cosyvoice-minicpmo` package (CosyVoice's flow/, hifigan/, transformer/ and Matcha's
decoder), built from a tiny `cosyvoice.yaml` laid out like the released CosyVoice-300M-25Hz one (including the LLM
and text-frontend entries the loader must leave alone) and randomly initialised: the audio is noise, its length,
streaming and plumbing are what is checked. Skipped when the `synth` extra is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import wave

import pytest
import torch

from megatron_cslm.errors import CslmError
from megatron_cslm.inference.inputs import Question
from megatron_cslm.inference.parse import ResponseParser
from megatron_cslm.inference.speech_out import SpeechOut, check_speech_out
from megatron_cslm.speech.duration_model import DurationConfig, DurationPredictor
from megatron_cslm.speech.identity import SpeechTokenizerId
from megatron_cslm.speech.synthesis import CosyVoiceSynthesizer, SpeakerPrompt, decoder_yaml

HAVE_SYNTH = all(importlib.util.find_spec(m) for m in ("hyperpyyaml", "cosyvoice", "diffusers", "conformer"))
requires_synth = pytest.mark.skipif(not HAVE_SYNTH, reason="needs the synth extra and `pip install --no-deps "
                                    "cosyvoice-minicpmo==0.1.0` (README: Speech out)")

RATE, SAMPLE_RATE, HOP = 25, 22050, 256  # CosyVoice-300M-25Hz: 25 units/s in, 22.05 kHz out, 256 samples per mel

# CosyVoice-300M-25Hz's cosyvoice.yaml, same sections and classes, tiny sizes.
TINY_COSYVOICE_YAML = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]

# fixed params
sample_rate: 22050
text_encoder_input_size: 32
llm_input_size: 32
spk_embed_dim: 192

llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 32
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 4096
    input_frame_rate: 25
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: 32
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 32
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [32]
            dropout: 0.0
            attention_head_dim: 16
            n_blocks: 1
            num_mid_blocks: 1
            num_heads: 2
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 32
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3]
    resblock_dilation_sizes: [[1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 32

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_tokenizer
    multilingual: True
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1024
    sampling_rate: !ref <sample_rate>
tokenize: !name:cosyvoice.dataset.processor.tokenize
    get_tokenizer: !ref <get_tokenizer>
data_pipeline: [
    !ref <tokenize>,
]
train_conf:
    max_epoch: 200
"""


# CosyVoice 2 (cosyvoice2.yaml): the causal flow of the v2 25 Hz tokenizer (6,561 codes; its encoder is fixed at
# 512 channels), 2 mel frames per unit, a 24 kHz HiFT with 480 samples per mel frame.
COSYVOICE2_FLOW = """\
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [32]
            dropout: 0.0
            attention_head_dim: 16
            n_blocks: 1
            num_mid_blocks: 1
            num_heads: 2
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

"""


def tiny_cosyvoice2_yaml() -> str:
    """The tiny CosyVoice-300M-25Hz YAML with CosyVoice 2's flow, rates and 24 kHz vocoder."""
    y = TINY_COSYVOICE_YAML
    y = y[:y.index("flow: !new")] + COSYVOICE2_FLOW + y[y.index("hift: !new"):]
    for old, new in (("sample_rate: 22050\n", "sample_rate: 24000\ntoken_frame_rate: 25\ntoken_mel_ratio: 2\n"
                                               "chunk_size: 25\nnum_decoding_left_chunks: -1\n"),
                     ("upsample_rates: [8, 8]", "upsample_rates: [8, 5, 3]"),
                     ("upsample_kernel_sizes: [16, 16]", "upsample_kernel_sizes: [16, 11, 7]"),
                     ("source_resblock_kernel_sizes: [7, 11]", "source_resblock_kernel_sizes: [7, 7, 11]"),
                     ("source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]",
                      "source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]")):
        assert old in y
        y = y.replace(old, new)
    return y


def expected_samples(frames: int) -> int:
    """CosyVoice-300M-25Hz: the flow makes int(frames / 25 * 22050 / 256) mel frames, HiFT 256 samples each."""
    return int(frames / RATE * SAMPLE_RATE / HOP) * HOP


@pytest.fixture(scope="module")
def cosyvoice_dir(one_thread, tmp_path_factory):
    """A CosyVoice model directory: the YAML, and flow.pt / hift.pt saved from a random initialisation (hift's
    keys with the `generator.` prefix of HiFi-GAN training checkpoints, which CosyVoice strips), plus a
    spk2info.pt with one speaker."""
    d = tmp_path_factory.mktemp("cosyvoice")
    (d / "cosyvoice.yaml").write_text(TINY_COSYVOICE_YAML)
    torch.manual_seed(0)
    synth = CosyVoiceSynthesizer.from_model_dir(d, load_weights=False)
    torch.save(synth.flow.state_dict(), d / "flow.pt")
    torch.save({f"generator.{k}": v for k, v in synth.hift.state_dict().items()}, d / "hift.pt")
    g = torch.Generator().manual_seed(1)
    torch.save({"spk_a": {"embedding": torch.randn(1, 192, generator=g)}}, d / "spk2info.pt")
    return d


@requires_synth
@pytest.mark.timeout(300)
def test_sa_chunks_become_audio_as_they_complete(cosyvoice_dir, speech_tokenizer, tmp_path):
    torch.manual_seed(0)
    synth = CosyVoiceSynthesizer.from_model_dir(cosyvoice_dir)  # loads flow.pt / hift.pt strictly
    assert (synth.units_per_second, synth.sample_rate, synth.samples_per_mel) == (RATE, SAMPLE_RATE, HOP)
    speaker = SpeakerPrompt.from_file(cosyvoice_dir / "spk2info.pt", "spk_a")
    out = SpeechOut(synth, durations=2, speaker=speaker)  # deduplicated units, 2 frames each
    tok = speech_tokenizer
    ids = tok.encode_text("[question]What is it?[answer]It is<sosp><11><12><13><14><15><16><17><eosp> a "
                          "cat.<sosp><21><22><23><eosp> Bye.<sosp><31><32><33><34><35><eosp><|eot_id|>")
    parser, events, question = ResponseParser(tok), [], Question("q1", "<1><2>", [1, 2])
    for position, token in enumerate(ids):  # the decode loop: chunks are handed on as the parser completes them
        for chunk in parser.feed(token):
            audio = out.on_chunk(question, chunk)  # what `decode --stream --synthesize` calls
            assert (audio is None) == (chunk.kind != "sa")
            if audio is not None:
                events.append((position, len(chunk.units), audio))
    assert [n for _, n, _ in events] == [7, 3, 5]
    sosp = [i for i, t in enumerate(ids) if t == tok.sosp_id]
    assert events[0][0] < sosp[1] and events[1][0] < sosp[2]  # each chunk's audio exists before the next starts
    for _, n, audio in events:
        assert audio.dim() == 1 and audio.numel() == expected_samples(2 * n)
        assert torch.isfinite(audio).all() and audio.abs().max() > 0
    summary = out.finish("q1", tmp_path / "q1.wav")
    assert [c["samples"] for c in summary["chunks"]] == [expected_samples(2 * n) for _, n, _ in events]
    with wave.open(str(tmp_path / "q1.wav")) as w:
        assert w.getframerate() == SAMPLE_RATE and w.getnframes() == summary["samples"] == sum(
            a.numel() for _, _, a in events)
    # the x-vector matters: another speaker, same units, other audio
    torch.manual_seed(0)
    neutral = synth.stream().push([11] * 14)
    torch.manual_seed(0)
    voiced = synth.stream(speaker).push([11] * 14)
    assert neutral.shape == voiced.shape and not torch.equal(neutral, voiced)


@requires_synth
@pytest.mark.timeout(300)
def test_synthesize_cli_and_its_one_line_errors(cosyvoice_dir, tmp_path, capsys):
    from megatron_cslm.cli.synthesize import main
    from megatron_cslm.tool import run_tool

    decoded = tmp_path / "decode.jsonl"
    decoded.write_text(json.dumps({"id": "a/1", "sa": [[5, 6, 7], [], [8, 9]]}) + "\n"
                       + json.dumps({"id": "b", "sa": [[40] * 12]}) + "\n")
    argv = ["--decode-output", str(decoded), "--cosyvoice-dir", str(cosyvoice_dir), "--unit-duration", "3",
            "--output-dir", str(tmp_path / "out")]
    assert run_tool(main, argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "synthesis.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a/1", "b"]
    assert [c["samples"] for c in rows[0]["chunks"]] == [expected_samples(9), expected_samples(6)]
    assert (tmp_path / "out" / "wav" / "a_1.wav").is_file() and rows[1]["samples"] == expected_samples(36)
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_tool(main, argv[:2] + ["--cosyvoice-dir", str(empty), "--output-dir", str(tmp_path / "o")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no cosyvoice.yaml or cosyvoice2.yaml" in err and "CosyVoice-300M-25Hz" in err
    (empty / "cosyvoice.yaml").write_text(TINY_COSYVOICE_YAML)
    assert run_tool(main, argv[:2] + ["--cosyvoice-dir", str(empty), "--output-dir", str(tmp_path / "o")]) == 4
    assert f"error: {empty / 'flow.pt'}: missing: the CosyVoice flow weights" in capsys.readouterr().err
    decoded.write_text(json.dumps({"id": "c", "sa": [[4096]]}) + "\n")
    assert run_tool(main, argv) == 3
    assert "unit 4096 is outside the CosyVoice flow's 4096 units" in capsys.readouterr().err


@requires_synth
@pytest.mark.timeout(120)
def test_codebook_and_frame_rate_checks_and_cosyvoice2(cosyvoice_dir):
    synth = CosyVoiceSynthesizer.from_model_dir(cosyvoice_dir, load_weights=False)
    v1 = SpeechTokenizerId.s3("speech_tokenizer_v1", "random-init:seed=0")  # 50 units/s
    predictor = DurationPredictor(DurationConfig(num_units=4096, dim=4, num_layers=1, speech_tokenizer=v1.to_dict()))
    with pytest.raises(CslmError, match=r"speech_tokenizer_v1 \(50 units/s.*reads 25 units/s"):
        check_speech_out(synth, predictor, None, "the duration predictor")
    v2 = SpeechTokenizerId.s3("speech_tokenizer_v2_25hz", "random-init:seed=0")
    with pytest.raises(CslmError, match="6561 codes.*has 4096 units"):
        check_speech_out(synth, None, v2, "decode.jsonl")
    check_speech_out(synth, None, SpeechTokenizerId.s3("speech_tokenizer_v1_25hz", "random-init:seed=0"), "ok")
    # CosyVoice 2 (cosyvoice2.yaml, causal flow): v2 units, 2 mel frames per unit, 480 samples per mel frame
    (cosyvoice_dir / "v2").mkdir()
    (cosyvoice_dir / "v2" / "cosyvoice2.yaml").write_text(tiny_cosyvoice2_yaml())
    synth2 = CosyVoiceSynthesizer.from_model_dir(cosyvoice_dir / "v2", load_weights=False)
    assert (synth2.units_per_second, synth2.num_units, synth2.sample_rate) == (25, 6561, 24000)
    check_speech_out(synth2, None, v2, "decode.jsonl")
    stream = synth2.stream()
    assert [stream.push([6000 + i for i in range(n)]).numel() for n in (9, 4)] == [9 * 2 * 480, 4 * 2 * 480]
    # only the flow and hift sections (and plain values) are built: no Whisper tokenizer, LLM or Matcha audio
    kept = decoder_yaml(TINY_COSYVOICE_YAML)
    assert "flow:" in kept and "hift:" in kept and "sample_rate: 22050" in kept
    assert "llm:" not in kept and "get_tokenizer" not in kept and "__set_seed1" not in kept
    assert "data_pipeline" not in kept and "max_epoch: 200" in kept  # refers to a left-out entry / plain


@pytest.mark.timeout(60)
def test_a_missing_package_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    """Runs with or without the synth extra: where CosyVoice is installed, its absence is simulated."""
    from megatron_cslm.cli.synthesize import main
    from megatron_cslm.tool import run_tool

    if HAVE_SYNTH:
        monkeypatch.setitem(sys.modules, "cosyvoice", None)  # `import cosyvoice` now fails as if not installed
    (tmp_path / "cosyvoice.yaml").write_text(TINY_COSYVOICE_YAML)
    (tmp_path / "units.txt").write_text("1 2 3\n")
    argv = ["--units", str(tmp_path / "units.txt"), "--cosyvoice-dir", str(tmp_path), "--output-dir", str(tmp_path)]
    assert run_tool(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps cosyvoice-minicpmo==0.1.0" in err
