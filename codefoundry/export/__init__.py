"""Export and interoperability: HF transformers and GGUF (llama.cpp) exports, and HF / GGUF import.
(Weight quantization lives beside inference: :mod:`codefoundry.infer.quantize`.)

* :mod:`~codefoundry.export.hf` — checkpoint -> transformers directory (native architectures only)
* :mod:`~codefoundry.export.gguf_export` — checkpoint -> one GGUF file for llama.cpp
* :mod:`~codefoundry.export.hf_import` — Llama-family transformers directory -> checkpoint
* :mod:`~codefoundry.export.gguf_import` — llama-family GGUF file (any gguf-dequantizable type) -> checkpoint
* :mod:`~codefoundry.export.chat_template` — our Jinja chat template (models trained here; imported
  models keep their own)
"""
