"""Batches for the reference host: a bucket sampler whose batches each hold one latent shape (resumable epoch by
epoch), and the collate that stacks one bucket's cached samples.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from simpletuner_dmd.errors import DataError, UserError

from .latent_cache import CachedDataset


def bucket_batches(
    dataset: CachedDataset, batch_size: int, *, seed: int, epoch: int = 0, drop_last: bool = False
) -> list[list[int]]:
    """One epoch of index batches; every batch holds one latent shape. Same (seed, epoch) -> same batches."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    groups: dict[tuple, list[int]] = {}
    for index, shape in enumerate(dataset.shapes):
        groups.setdefault(tuple(shape), []).append(index)
    batches = []
    for shape in sorted(groups):  # sorted: dict order must not decide the shuffle
        indices = rng.permutation(groups[shape]).tolist()
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]


class BucketBatchSampler(Sampler[list[int]]):
    """Yields `bucket_batches` epoch after epoch; its state (epoch, position) makes a resumed run see the same batches.

    Iterating yields the rest of the current epoch, then moves to the next. With DataLoader workers prefetching, the
    sampler runs ahead of training, so on resume call `skip_to(batches the trainer actually consumed)`.
    """

    def __init__(self, dataset: CachedDataset, batch_size: int, *, seed: int, drop_last: bool = False):
        self.dataset, self.batch_size, self.seed, self.drop_last = dataset, batch_size, seed, drop_last
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._per_epoch = len(bucket_batches(dataset, batch_size, seed=seed, drop_last=drop_last))
        if self._per_epoch == 0:
            largest = max((self.dataset.shapes.count(s) for s in set(self.dataset.shapes)), default=0)
            raise DataError(
                f"no full batch of {batch_size}: the largest group of same-shape samples has {largest}; "
                "lower the batch size, raise repeats, or do not drop the last batch"
            )

    def __len__(self) -> int:
        return self._per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        batches = bucket_batches(
            self.dataset, self.batch_size, seed=self.seed, epoch=self.epoch, drop_last=self.drop_last
        )
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def skip_to(self, batches_consumed: int) -> None:
        """Continue as if `batches_consumed` batches had been taken since epoch 0."""
        self.epoch, self.position = divmod(batches_consumed, self._per_epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items: latents (B,C,F,H,W), prompt_embeds (B,L,D), captions and paths as lists; and
    ``clip`` ({name: (B, ...)}) when the items carry a family's ``clip_condition``."""
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(shapes) != 1:
        raise ValueError(f"collate got latents of several shapes {sorted(shapes)}; batch with BucketBatchSampler")
    # Wan zero-pads text embeddings to a fixed length, so padding shorter ones with zeros changes nothing.
    length = max(item["prompt_embeds"].shape[0] for item in items)
    embeds = [torch.nn.functional.pad(item["prompt_embeds"], (0, 0, 0, length - item["prompt_embeds"].shape[0]))
              for item in items]  # fmt: skip
    batch = {
        "latents": torch.stack([item["latents"] for item in items]),
        "prompt_embeds": torch.stack(embeds),
        "captions": [item["caption"] for item in items],
        "paths": [item["path"] for item in items],
    }
    if "clip" in items[0]:  # a family's clip_condition, cached with each clip's latents
        batch["clip"] = {name: torch.stack([item["clip"][name] for item in items]) for name in items[0]["clip"]}
    return batch
