"""Replay of an earlier task: random training images and the frozen teacher's outputs on them.

Replay images get a random horizontal flip but no colour jitter, so the teacher's answer
for (image, flip) never changes during a stage. By default it is computed once per stage
for both flips of every image (240 images -> 480 teacher forwards, instead of one teacher
forward per replay batch on every step). `precompute=False` is the straightforward way,
kept for the speed benchmark: decode the images again and run the teacher on every batch.
"""
import torch

# The outputs each earlier task is distilled through (see losses.distillation_loss).
DISTILLED_OUTPUTS = {"seg": ("seg_coarse",), "det": ("det", "feat"), "cls": ("cls",)}


class ReplayBank:
    def __init__(self, dataset, teacher, generator, precompute=True, precompute_batch_size=32, amp_dtype=None,
                 keys=None):
        """keys: the teacher outputs to keep (default: those the dataset's task is distilled through)."""
        self.dataset, self.teacher, self.generator, self.amp_dtype = dataset, teacher, generator, amp_dtype
        self.keys = keys or DISTILLED_OUTPUTS[dataset.task]
        self.images = dataset.images_uint8() if precompute else None  # (N, 3, S, S) uint8, CPU
        self.teacher_outputs = self._precompute(precompute_batch_size) if precompute else None

    def __len__(self):
        return len(self.dataset)

    @torch.no_grad()
    def _teacher(self, images):
        device_type = self.teacher.mean.device.type
        with torch.autocast(device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.teacher(self.teacher.prepare_input(images))
        return {k: outputs[k].float() for k in self.keys}

    def _precompute(self, batch_size):
        """{key: (N, 2, ...)} teacher outputs for every image, unflipped [:, 0] and flipped [:, 1]."""
        chunks = {k: [] for k in self.keys}
        for start in range(0, len(self), batch_size):
            batch = self.images[start:start + batch_size]
            plain, flipped = self._teacher(batch), self._teacher(batch.flip(-1))
            for k in self.keys:
                chunks[k].append(torch.stack([plain[k], flipped[k]], 1))
        return {k: torch.cat(v) for k, v in chunks.items()}

    def sample(self, batch_size):
        """(images uint8 (B, 3, S, S), teacher outputs dict) for random images and flips."""
        index = torch.randint(len(self), (batch_size,), generator=self.generator)
        flip = torch.rand(batch_size, generator=self.generator) < 0.5
        if self.images is not None:
            images = self.images[index]
        else:
            images = torch.stack([self.dataset.resized(int(i))[0] for i in index])
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.teacher_outputs is not None:
            device = next(iter(self.teacher_outputs.values())).device
            index, flip = index.to(device), flip.long().to(device)
            return images, {k: v[index, flip] for k, v in self.teacher_outputs.items()}
        return images, self._teacher(images)
