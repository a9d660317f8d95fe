"""asv benchmarks of the streaming NC statistics: ``NCStats.update`` over all batches +
``compute`` against its floor (a bare float32 ``X.T @ X`` loop over the same batches) and
against the per-class loop of the evaluation code of Zhu et al. (2021) and Zhou et al. (2022);
and a sweep over the number of classes K up to a vocabulary's (131072 at d = 1024): time and
peak memory of ``update`` and of ``compute`` with a classifier."""

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
    """The pattern of the seed authors' evaluation code: one pass for the class means, a second
    for the within-class scatter, each looping over the classes of every batch and summing the
    per-sample outer products (n_k, d, d) of the centred rows, in the features' float32."""
    dim = batches[0][0].shape[1]
    sums = torch.zeros(num_classes, dim)
    counts = torch.zeros(num_classes)
    for features, target in batches:
        for k in range(num_classes):
            rows = features[target == k]
            sums[k] += rows.sum(0)
            counts[k] += rows.shape[0]
    means = sums / counts[:, None]
    scatter = torch.zeros(dim, dim)
    for features, target in batches:
        for k in range(num_classes):
            z = features[target == k] - means[k]
            scatter += torch.matmul(z[:, :, None], z[:, None, :]).sum(0)
    return scatter


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


class NCStatsClasses:
    """K sweep at d = 1024: ``update`` over 4 batches of 8192 fp32 rows (labels uniform over
    K), and ``compute`` with a classifier W, b (float32 pairwise tiles above 8192 classes) on a
    state loaded directly (no streaming in setup). compute is O(K²·d): one round, one run."""

    params = ([1024, 8192, 32768, 131072],)
    param_names = ["K"]
    timeout = 3600
    rounds = 1
    repeat = 1
    number = 1
    warmup_time = 0
    dim = 1024

    def setup(self, K):
        g = torch.Generator().manual_seed(0)
        d = self.dim
        self.batches = [(torch.randn(8192, d, generator=g), torch.randint(0, K, (8192,), generator=g))
                        for _ in range(4)]
        self.weight = torch.randn(K, d, generator=g)
        self.bias = torch.randn(K, generator=g)
        spread = torch.randn(d, d, dtype=torch.float64, generator=g)
        self.state = {
            "num_classes": K, "dim": d, "counts": torch.full((K,), 8.0, dtype=torch.float64),
            "means": torch.randn(K, d, dtype=torch.float64, generator=g),
            "within_scatter": spread @ spread.T, "class_sq": torch.rand(K, dtype=torch.float64, generator=g) + 1,
        }

    def _update(self, K):
        stats = ncfast.NCStats(K, self.dim)
        for features, target in self.batches:
            stats.update(features, target)

    def _compute(self, K):
        stats = ncfast.NCStats(K, self.dim)
        stats.load_state_dict(self.state)
        stats.compute(self.weight, self.bias)

    def time_update(self, K):
        self._update(K)

    def peakmem_update(self, K):
        self._update(K)

    def time_compute(self, K):
        self._compute(K)

    def peakmem_compute(self, K):
        self._compute(K)
