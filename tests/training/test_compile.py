"""compile: true compiles each fused layer; the step and the saved names are those of eager mode."""

import torch

from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.model.sequence import SequenceBuilder
from lmfusion.testing import tiny_lmfusion_config, tiny_text_model, tiny_tokenizer
from lmfusion.training.parallelize import compile_layers


def _model():
    torch.manual_seed(0)
    return LMFusionModel(tiny_text_model(300), tiny_lmfusion_config(), tokenizer=tiny_tokenizer(300))


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    sums = model.loss_sums(batch, torch.Generator().manual_seed(3))
    loss = sums.text / sums.text_tokens + 5 * sums.image / sums.images
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_train_like_eager_and_save_the_same_names():
    eager, compiled = _model(), _model()
    compiled.enable_gradient_checkpointing()  # torchtitan's order: checkpointing, then compile
    compile_layers(compiled)
    assert all(isinstance(layer, torch._dynamo.eval_frame.OptimizedModule) for layer in compiled.layers)
    builder = SequenceBuilder(eager.tokenizer, eager.boi_token_id, eager.eoi_token_id, eager.config.tokens_per_image)
    examples = [builder.text_then_image("a red circle"), builder.image_then_text("a blue square")]
    latents = torch.randn(2, eager.config.latent_channels, eager.config.latent_size, eager.config.latent_size)
    batch = builder.pack(examples, latents, 64)
    loss_a, grads_a = _step(eager, batch)
    loss_b, grads_b = _step(compiled, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    assert set(grads_a) == set(grads_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict())
    assert set(compiled.adapter_state_dict()) == set(eager.adapter_state_dict())
    fresh = _model()
    fresh.load_adapter_state(compiled.adapter_state_dict())  # a compiled run's adapter loads into a plain model
    assert compiled.fusion_layers()[0] is compiled.layers[0]._orig_mod._checkpoint_wrapped_module
