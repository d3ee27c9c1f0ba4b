"""calm_utils: the code behind the CALM early-exit reproducibility study.

One module per concept (see README.md):

- ``utils``       seeds, cache directory, atomic writes, device choice
- ``model``       ``load_model``: SmolLM2 offline from GGUF (cached as safetensors) or any HF id
- ``layerwise``   a layer-by-layer view of a HF decoder-only model (and T5 decoder)
- ``confidence``  confidence measures selected by name (CALM's names)
- ``decoding``    early-exit greedy decoding and its result object
- ``data``        data sets (Multi30k, SQuAD, SciTLDR, newstest2014)
- ``metrics``     BLEU, ROUGE-L, SQuAD F1 and textual consistency
- ``calibration`` Learn-then-Test threshold calibration
"""

__version__ = "0.1.0"
