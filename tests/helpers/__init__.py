"""What the test modules share, one concern per module; tests never import helpers from other test modules.

- launch: torchrun and worker environments, signalling the trainers under a launcher (`launches` marks)
- files: tools/ scripts loaded as modules, JSONL/TSV files
- belle: the BELLE-eval-S2S opt-in
- speech: short real-speech clips
- toy: the toy corpus / tokenizer / .bin/.idx and packed SFT data
- training: a toy pretraining command line and the TensorBoard scalars a run logged
- hf: random-weight Hugging Face Llama directories and their tensors

Everything a test needs is written by the test itself (or is a small file of ours under tests/data/), so a
fresh clone anywhere passes the suite.
"""
