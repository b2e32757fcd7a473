"""A small LLaVA-style VLM built here (issue 15): SmolLM2 + a SigLIP tower trained from scratch.

It is a plain transformers `LlavaForConditionalGeneration` folder, so that LMFusion's VLM
wrapping has a real VLM to wrap where no pretrained one can be downloaded. Nothing in
lmfusion.model or lmfusion.sampling imports this package.
"""
