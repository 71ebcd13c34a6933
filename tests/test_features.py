"""Input features for latency models (tracing/features.py): read from shapes at the call's entry,
copied to the host after its sync, counted when the record is built; what the inputs do not
tell is None, never a guess."""
from __future__ import annotations

import torch

from stagetrace.tracing.features import queue_features


class _Cfg:
    image_token_id = 7


def _resolve(**kwargs):
    ids = torch.tensor([[1, 7, 7, 7, 5, 6], [0, 1, 7, 7, 7, 5]])
    mask = torch.tensor([[1] * 6, [0] + [1] * 5])
    return queue_features(dict(kwargs, attention_mask=mask), ids, _Cfg()).hold().resolve()


def test_image_tokens_and_text_tokens_count_the_attended_prompt():
    f = _resolve()
    assert f["image_tokens"] == 6 and f["text_tokens"] == 11 - 6 and f["images"] is None and f["image_sizes"] == []


def test_images_and_sizes_come_from_the_processors_rows_where_it_gives_them():
    f = _resolve(pixel_values=torch.zeros(2, 5, 3, 8, 8), image_sizes=torch.tensor([[480, 640], [300, 200]]))
    assert f["images"] == 2 and f["image_sizes"] == [[480, 640], [300, 200]]  # as given, not the tiles
    f = _resolve(pixel_values=torch.zeros(40, 12), image_grid_thw=torch.tensor([[1, 4, 6], [1, 2, 2], [1, 2, 4]]))
    assert f["images"] == 3 and f["image_sizes"] == []  # grid rows count images; their pixel size is not in them


def test_one_image_per_row_of_4d_pixels_and_unknown_for_5d_crops():
    f = _resolve(pixel_values=torch.zeros(3, 3, 336, 336))
    assert f["images"] == 3 and f["image_sizes"] == [[336, 336]] * 3  # the size the model sees
    # Idefics3 / SmolVLM: (batch, padded crops of every image, C, H, W) says neither how many
    # images nor their size: not the batch, not a crop
    f = _resolve(pixel_values=torch.zeros(2, 13, 3, 32, 32))
    assert f["images"] is None and f["image_sizes"] == []


def test_what_is_held_is_a_copy_the_callers_buffers_cannot_change():
    """Static-input serving reuses its input buffers for the next call: the counts are of this
    call's inputs, however late the record is built."""
    ids = torch.tensor([[1, 7, 7, 5]])
    mask = torch.ones(1, 4, dtype=torch.long)
    sizes = torch.tensor([[480, 640]])
    held = queue_features(dict(attention_mask=mask, image_sizes=sizes, pixel_values=torch.zeros(1, 3, 8, 8, 8)),
                          ids, _Cfg()).hold()
    ids.fill_(7), mask.zero_(), sizes.zero_()
    f = held.resolve()
    assert f["image_tokens"] == 2 and f["text_tokens"] == 2 and f["image_sizes"] == [[480, 640]]


def test_without_placeholder_ids_or_mask_only_the_shape_is_read():
    class NoImages:
        pass

    held = queue_features({}, torch.tensor([[1, 2, 3], [4, 5, 6]]), NoImages()).hold()
    assert held.ids is None and held.mask is None  # nothing copied that no count reads
    assert held.resolve()["text_tokens"] == 6 and held.resolve()["image_tokens"] is None
    assert queue_features({}, None, _Cfg()).hold().resolve()["text_tokens"] is None  # embeds only: not told
