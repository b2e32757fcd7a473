"""`lmfusion train` on a VLM base (llavafusion): the generation side trains, the VLM does not move."""

from __future__ import annotations

import torch

from lmfusion.base_models import load_text_model, weights_hash
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.testing import save_tiny_vlm
from lmfusion.training import train
from lmfusion.training.checkpoint import resolve_checkpoint


def test_training_on_a_vlm_base_keeps_the_vlm_and_saves_a_loadable_adapter(make_config, tmp_path):
    folder = save_tiny_vlm(tmp_path / "vlm", "llava_next", "clip")
    vlm, _ = load_text_model(str(folder))
    before = weights_hash(vlm)
    config = make_config(base_model=str(folder), max_steps=4, checkpoint_every=4, image_first_ratio=0.0,
                         sample_every=0)
    summary = train(config)
    assert summary["steps"] == 4
    model = LMFusionModel.from_pretrained(resolve_checkpoint(config.run_dir))  # checks the base hash
    assert model.is_vlm and model.processor is not None
    assert weights_hash(model.text_model) == before
    initial = LMFusionModel.from_text_model(str(folder), model.config)
    moved = [name for name, p in initial.adapter_state_dict().items()
             if not torch.equal(p, model.adapter_state_dict()[name])]
    assert any(name.startswith("image_layers.") for name in moved)
