"""The FID feature net: learns the shapes labels, is cached per dataset, round-trips through safetensors."""

import time

import torch

from lmfusion.evaluation.data import feature_net_for, load_split, split_paths
from lmfusion.evaluation.feature_net import (
    FeatureNetRecipe,
    label_matrix,
    label_space,
    load_feature_net,
    shapes_label_names,
    shapes_labels,
)


def test_trains_to_high_accuracy_and_is_cached(shapes_data, feature_cache):
    net, path = feature_net_for(shapes_data, FeatureNetRecipe(), feature_cache)
    # Balanced accuracy is 0.5 for a net that ignores the image (labels are sparse).
    assert net.kind == "shapes"
    assert net.metrics["balanced_accuracy"] >= 0.85, net.metrics
    assert net.metrics["label_accuracy"] >= 0.9, net.metrics
    assert path.is_file() and path.suffix == ".safetensors"

    started = time.time()
    again, again_path = feature_net_for(shapes_data, FeatureNetRecipe(), feature_cache)
    assert again_path == path and time.time() - started < 10  # loaded, not retrained
    images = load_split(split_paths(shapes_data)[1], 32, 8).images
    assert torch.equal(torch.from_numpy(net.features(images)), torch.from_numpy(again.features(images)))
    assert net.features(images).shape == (8, FeatureNetRecipe().feature_dim)


def test_other_recipe_or_data_gets_another_cache_file(shapes_data, feature_cache):
    _, path = feature_net_for(shapes_data, FeatureNetRecipe(), feature_cache)
    tiny = FeatureNetRecipe(epochs=1, max_train_images=32)
    net, other = feature_net_for(shapes_data, tiny, feature_cache)
    assert other != path
    assert load_feature_net(other).recipe == tiny
    assert net.metrics["train_images"] == 32


def test_shapes_labels_describe_the_scene():
    objects = [{"shape": "circle", "colour": "red", "size": "small", "x": 0.2, "y": 0.5},
               {"shape": "square", "colour": "blue", "size": "large", "x": 0.8, "y": 0.5}]
    assert shapes_labels(objects) == {"two_objects", "shape:circle", "shape:square", "colour:red", "colour:blue",
                                      "size:small", "size:large", "cell:0,1", "cell:2,1"}
    assert shapes_labels(objects) <= set(shapes_label_names())


def test_caption_words_are_the_labels_without_scenes():
    captions = ["a cat on a mat", "a dog on a log", "a cat and a dog"]
    kind, names = label_space(captions, [{}, {}, {}], vocab_size=4)
    assert kind == "words" and names[0] == "word:a" and len(names) == 4
    targets = label_matrix(kind, names, captions, [{}, {}, {}])
    assert targets.shape == (3, 4) and bool(targets[:, 0].all())
