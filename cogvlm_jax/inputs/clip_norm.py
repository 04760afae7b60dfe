"""The CLIP mean and std (per RGB channel) that both image and video pixels are normalised with."""

import numpy as np

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
