"""Training on chat conversations (task: chat): a tiny model learns when to emit BOI."""

from __future__ import annotations

import pytest
import torch

from lmfusion.data.shapes_chat import generate_shapes_chat, read_chat_rows, user_turn_ids
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.run_folders import resolve_checkpoint
from lmfusion.sampling.context import Context
from lmfusion.testing import save_peaky_base
from lmfusion.training import train
from lmfusion.training.chat_data import ChatLatents
from lmfusion.training.data import ExamplePlanner, build_batch_source, open_latent_store
from lmfusion.training.loop import build_model


@pytest.fixture(scope="module")
def peaky_base(tmp_path_factory):
    # Peaked base logits, as a real LM's are: with the default tiny init the base distribution is
    # nearly flat, so the cross-entropy barely penalises a BOI logit just above the top text logit
    # (its gradient is p(BOI), about 1/V) and "BOI must not fire" is not learnt in a few steps.
    return save_peaky_base(tmp_path_factory.mktemp("peaky") / "base")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, peaky_base):
    # lead_in_tokens 0: the BOI decision is the reply's first token, which the training test reads
    return generate_shapes_chat(tmp_path_factory.mktemp("chat") / "set", 30, base_model=str(peaky_base), size=16,
                                reply_tokens=6, lead_in_tokens=0, test_fraction=0.2, progress=False)


def test_chat_store_and_batches_hold_each_rows_images(make_config, chat_data, peaky_base):
    config = make_config(data=str(chat_data), task="chat", base_model=str(peaky_base))
    model, codec = build_model(config)
    store = open_latent_store(config, codec, progress=False, say=lambda _: None)
    assert isinstance(store, ChatLatents) and len(store) == 24  # the train split
    assert [len(r) for r in store.image_rows[:3]] == [1, 2, 0]  # draw, draw_edit, text in turn
    source = build_batch_source(store, model, config)
    batch, plans = source.batch(range(6))
    assert all(p.kind == "chat" for p in plans)
    wanted = sum(len(store.image_rows[p.record]) for p in plans)
    assert batch.latents.shape[0] == wanted  # every image of every row, in reading order
    assert batch.num_loss_images == sum(len(store.image_rows[p.record]) > 0 for p in plans)  # one target per drawing row
    assert open_latent_store(config, codec, progress=False, say=lambda _: None).from_cache


def test_planner_mixes_edits_into_chat_at_the_given_ratio():
    planner = ExamplePlanner(40, seed=0, chat=True, n_edits=10, chat_edit_ratio=0.3)
    kinds = [planner.plan(p).kind for p in range(2000)]
    assert set(kinds) == {"chat", "edit"} and 0.26 < kinds.count("edit") / len(kinds) < 0.34


def test_planner_makes_the_asked_share_of_chats_clean_and_none_by_default():
    plain = ExamplePlanner(40, seed=0, chat=True, n_edits=10, chat_edit_ratio=0.3)
    clean = ExamplePlanner(40, seed=0, chat=True, n_edits=10, chat_edit_ratio=0.3, chat_clean_stop_ratio=0.25)
    plans, plain_plans = [clean.plan(p) for p in range(2000)], [plain.plan(p) for p in range(2000)]
    assert not any(p.clean_image for p in plain_plans)
    chats = [p for p in plans if p.kind == "chat"]
    assert 0.21 < sum(p.clean_image for p in chats) / len(chats) < 0.29
    assert not any(p.clean_image for p in plans if p.kind == "edit")
    # the same records and kinds as without it: a run's data order does not move
    assert [(p.record, p.kind) for p in plans] == [(p.record, p.kind) for p in plain_plans]


def boi_wins(model, users: list[str]) -> list[bool]:
    """Per user turn: greedy with BOI allowed picks BOI as the reply's first token (one left-padded batch)."""
    with torch.no_grad():
        context = Context.from_tokens(model, [user_turn_ids(model.tokenizer, u) for u in users], use_cache=False)
    return (context.logits.argmax(-1) == model.boi_token_id).tolist()


def test_a_briefly_trained_model_draws_when_asked_and_not_for_a_question(make_config, chat_data, peaky_base):
    config = make_config(data=str(chat_data), task="chat", base_model=str(peaky_base), max_steps=60, batch_size=8,
                         lr=2e-2, min_lr=2e-2, warmup_steps=0, probe_every=0)
    untrained, _ = build_model(config)
    rows = read_chat_rows(chat_data / "train" / "chat.jsonl")
    assert not any(boi_wins(untrained, [r["user"] for r in rows]))  # the BOI row starts as an "average token"
    train(config)
    model = LMFusionModel.from_pretrained(resolve_checkpoint(str(config.run_dir))).eval()
    draws = [r["user"] for r in rows if r["kind"] != "text"]
    questions = [r["user"] for r in rows if r["kind"] == "text"]
    assert draws and questions  # the tiny random base reads too little to generalise to unseen wording; the
    # held-out split is what `lmfusion eval --task chat` measures on a real base
    assert all(boi_wins(model, draws)), draws
    assert not any(boi_wins(model, questions)), questions


def test_an_instruct_style_run_makes_both_sets_and_mixes_edits_in(make_config, tmp_path):
    config = make_config(data=str(tmp_path / "chat"), generate_shapes_chat=6, task="chat",
                         chat_edit_data=str(tmp_path / "edits"), generate_shapes_edits=6, chat_edit_ratio=0.5,
                         max_steps=2, batch_size=4, probe_every=5, sample_every=1)
    summary = train(config)
    assert (tmp_path / "chat" / "train" / "chat.jsonl").is_file() and (tmp_path / "edits" / "train").is_dir()
    log = (config.run_dir / "train.log").read_text()
    assert "mixed with 5 editing triples" in log and "probes: skipped for chat data" in log
    assert "no sample grid for chat data" in log
    assert torch.isfinite(torch.tensor(summary["final"]["loss"]))


def test_the_instruct_preset_trains_chat_and_edits_from_the_quickstart():
    from lmfusion.training import load_config

    config = load_config("instruct")
    assert (config.task, config.init_from, config.chat_edit_ratio) == ("chat", "runs/quickstart", 0.5)
    assert config.generate_shapes_chat > 0 and config.generate_shapes_edits > 0 and config.chat_edit_data
    with pytest.raises(ValueError, match="chat_edit_ratio .* needs chat_edit_data"):
        load_config("instruct", overrides={"chat_edit_data": ""})
