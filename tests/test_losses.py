import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from singularity_ds.models import losses


def brute_itc(sim, idx):
    """Row-by-row soft-target cross-entropy, written out with loops."""
    total = 0.0
    for i in range(sim.shape[0]):
        pos = [j for j in range(sim.shape[1]) if idx[i] == idx[j]]
        logz = math.log(sum(math.exp(s) for s in sim[i].tolist()))
        total += sum(-(sim[i, j].item() - logz) / len(pos) for j in pos)
    return total / sim.shape[0]


def test_itc_soft_targets_with_several_positives():
    torch.manual_seed(0)
    sim = torch.randn(5, 5)
    idx = torch.tensor([0, 1, 0, 2, 1])  # items 0/2 and 1/4 are captions of the same video
    expected = (brute_itc(sim, idx) + brute_itc(sim.T.contiguous(), idx)) / 2
    assert losses.itc_loss(sim, sim.T, idx).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("hard", [True, False])
def test_negatives_are_never_positives(hard):
    torch.manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 2, 3])
    for _ in range(20):
        sim = torch.randn(6, 6) * 5
        img_neg, txt_neg = losses.sample_negatives(sim, sim.T, idx, hard=hard)
        assert (idx[img_neg] != idx).all() and (idx[txt_neg] != idx).all()
    with pytest.raises(ValueError, match="needs a negative"):
        losses.sample_negatives(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([4, 4]))


def test_mlm_masking_follows_the_original_rules():
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (200, 40))
    ids[:, 0], ids[:, 30:] = 101, 0  # [CLS] first, padding after 30
    masked, labels = losses.mask_tokens(ids, vocab_size=30522, mlm_prob=0.5)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 30:].any()  # never [CLS] or padding
    assert torch.equal(labels[chosen], ids[chosen])
    frac = chosen[:, 1:30].float().mean().item()
    assert 0.47 < frac < 0.53
    to_mask = (masked[chosen] == 103).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.77 < to_mask < 0.83 and 0.07 < unchanged < 0.14
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_frame_ensembles():
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # (N=1, T=2, 2)
    assert torch.equal(losses.ensemble_frames(x, "mean"), torch.tensor([[2.0, 0.5]]))
    assert torch.equal(losses.ensemble_frames(x, "max"), torch.tensor([[3.0, 2.0]]))
    assert torch.allclose(losses.ensemble_frames(x, "lse"), torch.log(torch.exp(x).sum(1)))
    with pytest.raises(ValueError, match="unknown frame ensemble 'median'"):
        losses.ensemble_frames(x, "median")


def _gather_worker(rank, world, port, img, txt, idx, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = img.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    i, t = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
    i_all, t_all = losses.gather_features(i, t)
    idx_all = losses.gather_no_grad(idx[sl])
    loss = losses.itc_loss(losses.similarity(i, t_all, 0.1), losses.similarity(i_all, t, 0.1).T, idx[sl],
                           idx_all)
    loss.backward()
    out[rank] = (loss.detach(), i.grad, t.grad)
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_itc_all_gather_with_gradient_equals_global_batch(free_port):
    """2 ranks: the mean of rank losses is the global-batch loss, and each rank's features get the
    global loss's gradient (times world size, as DDP then averages)."""
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 2, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    idx = torch.tensor([0, 1, 2, 0, 3, 4])  # a positive pair across ranks (0 and 3)
    out = mp.Manager().dict()
    mp.start_processes(_gather_worker, args=(2, free_port, img, txt, idx, out), nprocs=2,
                       start_method="spawn")
    gi, gt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    sim = losses.similarity(gi, gt, 0.1)
    ref = losses.itc_loss(sim, sim.T, idx)
    (2 * ref).backward()
    assert (out[0][0] + out[1][0]).item() / 2 == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]), gi.grad, atol=1e-6)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]), gt.grad, atol=1e-6)
