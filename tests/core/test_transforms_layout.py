"""The classify transforms hand the float steps a channel-by-channel (contiguous) tensor — the layout they run
fastest on — and produce exactly what torchvision's own steps produce without that."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from visiontune.core.transforms import Contiguous, Preprocess, eval_transform, train_transform


@pytest.mark.parametrize("which", ["eval", "light", "strong"])
def test_samples_come_out_contiguous_with_the_same_values(which):
    pre = Preprocess(64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    transform = eval_transform(pre) if which == "eval" else train_transform(pre, preset=which)
    plain = v2.Compose([t for t in transform.transforms if not isinstance(t, Contiguous)])
    assert len(plain.transforms) == len(transform.transforms) - 1
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    torch.manual_seed(0)
    ours = transform(image)
    torch.manual_seed(0)
    theirs = plain(image)
    assert ours.is_contiguous() and isinstance(ours, tv_tensors.Image)
    assert torch.equal(ours, theirs)
