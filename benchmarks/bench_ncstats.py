"""asv benchmarks of the streaming NC statistics (SPEC §3, §7): ``NCStats.update`` over all
batches + ``compute`` against its floor (a bare float32 ``X.T @ X`` loop over the same batches)
and against the per-class loop of the seed authors' evaluation code."""

import torch

import ncfast


def _batches(num_samples, dim, num_classes, batch_size, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(num_samples, dim, generator=g).to(dtype)
    target = torch.randint(0, num_classes, (num_samples,), generator=g)
    return [(features[i:i + batch_size], target[i:i + batch_size]) for i in range(0, num_samples, batch_size)]


def streaming_update(batches, num_classes, dim):
    stats = ncfast.NCStats(num_classes, dim)
    for features, target in batches:
        stats.update(features, target)
    return stats.compute()


def bare_gram(batches, dim):
    """The floor: one float32 Gram per batch, nothing else."""
    gram = torch.zeros(dim, dim)
    for features, _ in batches:
        gram += features.T @ features
    return gram


def per_class_loop(batches, num_classes):
    """The seed authors' pattern: for each class select its rows, then its mean and covariance."""
    for features, target in batches:
        for k in range(num_classes):
            rows = features[target == k].double()
            centred = rows - rows.mean(0)
            centred.T @ centred


class NCStatsUpdate:
    params = ([(131072, 512, 100, 8192), (32768, 2048, 10, 4096), (65536, 64, 1000, 8192)],)
    param_names = ["N_d_K_batch"]
    timeout = 300

    def setup(self, shape):
        self.N, self.d, self.K, self.batch = shape
        self.batches = _batches(self.N, self.d, self.K, self.batch)

    def time_update_and_compute(self, shape):
        streaming_update(self.batches, self.K, self.d)

    def time_bare_fp32_gram(self, shape):
        bare_gram(self.batches, self.d)

    def time_per_class_loop(self, shape):
        per_class_loop(self.batches, self.K)

    def peakmem_update_and_compute(self, shape):
        streaming_update(self.batches, self.K, self.d)


class NCStatsDtypes:
    params = (["float32", "float64", "bfloat16"], ["cpp", "torch"])
    param_names = ["dtype", "backend"]

    def setup(self, dtype, backend):
        self.batches = _batches(32768, 256, 100, 4096, getattr(torch, dtype))

    def time_update_and_compute(self, dtype, backend):
        with ncfast.use_backend(backend):
            streaming_update(self.batches, 100, 256)
