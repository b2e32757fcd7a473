"""The chat layout: user turn (no targets), lead-in, [BOI image EOI] x 1-2, EOS; or the base's reply."""

import pytest
import torch

from lmfusion.model.sequence import CLEAN_IMAGE, SequenceBuilder
from lmfusion.testing import tiny_tokenizer

BOI, EOI, N = 1000, 1001, 4  # ids past the tiny vocabulary, as the model's are


@pytest.fixture(scope="module")
def builder():
    return SequenceBuilder(tiny_tokenizer(), BOI, EOI, N)


def _targets(builder, examples, latents, pack_length=0):
    batch = builder.pack(examples, latents, pack_length) if pack_length else builder.collate(examples, latents)
    wants, labels = batch.text_targets()
    return batch, wants, labels


@pytest.mark.parametrize("pack_length", [0, 120])
def test_targets_start_at_the_reply_and_the_row_before_boi_predicts_boi(builder, pack_length):
    user = builder.encode("Draw a red circle.")
    lead = builder.encode("Sure:")
    one = builder.chat(user, "Sure:", 1)
    assert one.ids == user + lead + [BOI] + [-1] * N + [EOI, builder.eos_id]
    assert one.max_timesteps == [builder.num_train_timesteps]  # the image is a noised target
    text = builder.chat(user, "", 0, reply="No.", reply_stopped=True)
    batch, wants, labels = _targets(builder, [one, text], torch.zeros(1, 3, 16, 16), pack_length)
    first = wants[0].nonzero().squeeze(1).tolist() if not pack_length else wants[0, : len(one.ids)].nonzero().squeeze(1).tolist()
    # the user turn predicts nothing except its last row, which predicts the reply's first token
    assert first[0] == len(user) - 1
    predicted = [one.ids[i + 1] for i in first]
    assert predicted == lead + [BOI, builder.eos_id]  # lead-in, then BOI; EOI predicts EOS; no patch is a target
    reply = builder.encode("No.")
    assert labels.tolist()[len(predicted):] == reply + [builder.eos_id]  # the text reply: the base's tokens, then EOS


def test_two_images_first_clean_second_target_back_to_back(builder):
    user = builder.encode("Draw a red circle, then make it blue.")
    two = builder.chat(user, "", 2)
    assert two.ids == user + [BOI] + [-1] * N + [EOI, BOI] + [-1] * N + [EOI, builder.eos_id]
    assert two.max_timesteps == [CLEAN_IMAGE, builder.num_train_timesteps]
    batch, wants, labels = _targets(builder, [two], torch.zeros(2, 3, 16, 16))
    assert batch.loss_images.tolist() == [False, True]
    assert labels.tolist() == [BOI, BOI, builder.eos_id]  # draw, draw again after EOI, then stop


def test_a_clean_single_image_teaches_the_stop_after_a_clean_image(builder):
    """The sampler appends a finished image clean: a lone clean image, no loss, then EOS."""
    user = builder.encode("Draw a red circle.")
    clean = builder.chat(user, "", 1, clean_single=True)
    assert clean.ids == builder.chat(user, "", 1).ids  # the same tokens; only the image's noise differs
    assert clean.max_timesteps == [CLEAN_IMAGE]
    batch, wants, labels = _targets(builder, [clean], torch.zeros(1, 3, 16, 16))
    assert batch.loss_images.tolist() == [False]
    assert labels.tolist() == [BOI, builder.eos_id]  # draw, then stop after the clean image's EOI
    assert builder.chat(user, "", 2, clean_single=True).max_timesteps == [CLEAN_IMAGE, builder.num_train_timesteps]


def test_a_reply_cut_at_its_token_limit_has_no_eos_and_bad_counts_are_refused(builder):
    cut = builder.chat([5, 6], "", 0, reply="abc", reply_stopped=False)
    assert cut.ids == [5, 6] + builder.encode("abc")
    with pytest.raises(ValueError, match="0, 1 or 2 images"):
        builder.chat([5], "", 3)
    # batches without chats carry no target mask: every other layout is what it was
    assert builder.collate([builder.text_only("hi")], None).target_mask is None
