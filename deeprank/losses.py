"""The training losses, as small pure functions on embeddings (imports torch only).

A miner looks at a batch's (B, B) distance matrix and its labels and returns the triplets to
learn from as index tensors (a, p, n) into the batch (as pytorch-metric-learning's miners do);
one triplet loss consumes them. Pre-sampled CSV batches need no miner: their rows are all
queries, then all positives, then all negatives, so a, p, n = 0..B, B..2B, 2B..3B.

    loss, stats = ranking_loss(embeddings, labels, "batch_all", margin=0.1, distance="euclidean")

The contrastive loss (pair_loss) takes pairs: a pair CSV's, or every pair of a P x K batch.
The multi-similarity loss (multi_similarity_loss) mines pairs of a P x K batch by its own rule.
Both also take reference rows (ref, ref_labels) other than the batch itself: cross-batch memory
(deeprank.loss_state), whose first rows are the batch's own (their self-pairs left out).
The proxy-anchor loss (proxy_anchor_loss) pairs each image with one learned proxy per class.
"""

import torch
import torch.nn.functional as F

DISTANCES = ("euclidean", "squared")
EPS = 1e-12  # inside the square root: a zero distance keeps a finite gradient


# ----------------------------------------------------------------------------- distances

def row_distances(x, y, distance):
    """Distance between row i of x and row i of y: (T, D), (T, D) -> (T,)."""
    d = (x - y).pow(2).sum(1)
    return (d + EPS).sqrt() if distance == "euclidean" else d


def distance_matrix(emb, distance, ref=None):
    """(B, M) distances between the rows of emb (B, D) and those of ref (M, D; emb itself when
    None): squared L2 or Euclidean."""
    ref = emb if ref is None else ref
    d = (emb.pow(2).sum(1)[:, None] + ref.pow(2).sum(1)[None, :] - 2 * emb @ ref.T).clamp(min=0)
    return (d + EPS).sqrt() if distance == "euclidean" else d


def pair_masks(labels, ref_labels=None):
    """(positive pair mask, negative pair mask) of a batch's (B,) labels against the references'
    (M,) (the batch itself when None; else the batch's own rows first), each (B, M) bool; an
    image is never its own positive."""
    ref_labels = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref_labels[None, :]
    eye = torch.eye(len(labels), len(ref_labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


# ----------------------------------------------------------------------------- miners -> (a, p, n)

def csv_triplets(rows, device):
    """(a, p, n) of a CSV batch of `rows` = 3B images: 0..B, B..2B, 2B..3B."""
    b = rows // 3
    a = torch.arange(b, device=device)
    return a, a + b, a + 2 * b


def all_triplets(d, labels):
    """Every valid (a, p, n) of the batch (Hermans et al.'s batch all)."""
    pos, neg = pair_masks(labels)
    return (pos[:, :, None] & neg[:, None, :]).nonzero(as_tuple=True)


def hard_triplets(d, labels):
    """Per anchor with a positive and a negative: its farthest positive, its nearest negative
    (Hermans et al.'s batch hard)."""
    pos, neg = pair_masks(labels)
    hardest_pos = d.masked_fill(~pos, float("-inf")).max(1).indices
    hardest_neg = d.masked_fill(~neg, float("inf")).min(1).indices
    a = (pos.any(1) & neg.any(1)).nonzero().flatten()
    return a, hardest_pos[a], hardest_neg[a]


def semihard_triplets(d, labels):
    """Per positive pair (a, p): the nearest negative farther than p (FaceNet's semi-hard);
    where none is, the farthest negative nearer than it."""
    pos, neg = pair_masks(labels)
    a, p = pos.nonzero(as_tuple=True)
    d_an = d[a]  # (pairs, B)
    neg_a = neg[a]
    outside = neg_a & (d_an > d[a, p][:, None])
    semi = d_an.masked_fill(~outside, float("inf")).min(1).indices
    inside = d_an.masked_fill(~neg_a, float("-inf")).max(1).indices
    n = torch.where(outside.any(1), semi, inside)
    ok = neg_a.any(1)
    return a[ok], p[ok], n[ok]


MINERS = {"batch_all": all_triplets, "batch_hard": hard_triplets, "batch_semihard": semihard_triplets}
AVERAGE_OVER_ACTIVE = ("batch_all",)  # Hermans et al.'s BA!=0: batch all averages over the non-zero terms


# ----------------------------------------------------------------------------- losses

def triplet_loss(d_ap, d_an, margin, soft=False, over_active=False):
    """(loss, active count) of triplets with distances d_ap, d_an (T,): the hinge
    max(0, margin + d_ap - d_an), or softplus(d_ap - d_an) with soft; averaged over all T
    triplets, or over the active ones (hinge > 0) with over_active. No triplet: a zero loss."""
    per_triplet = F.softplus(d_ap - d_an) if soft else F.relu(margin + d_ap - d_an)
    active = int((margin + d_ap - d_an > 0).sum())
    if len(per_triplet) == 0:
        return d_ap.sum() * 0, 0
    if over_active and not soft:
        return per_triplet.sum() / max(active, 1), active
    return per_triplet.mean(), active


def ranking_loss(emb, labels, mining, margin, distance, soft=False):
    """(loss, stats) of one batch of embeddings (N, D): triplets mined by `mining` from the
    labels (N,), or the CSV batch's own triplets when labels is None. stats: active and count
    (triplets), d_pos and d_neg (mean positive and negative pair distance)."""
    if labels is None:
        a, p, n = csv_triplets(len(emb), emb.device)
        d_ap, d_an = row_distances(emb[a], emb[p], distance), row_distances(emb[a], emb[n], distance)
        loss, active = triplet_loss(d_ap, d_an, margin, soft)
        d_pos, d_neg = d_ap.detach(), d_an.detach()
    else:
        d = distance_matrix(emb, distance)
        a, p, n = MINERS[mining](d.detach(), labels)
        loss, active = triplet_loss(d[a, p], d[a, n], margin, soft, mining in AVERAGE_OVER_ACTIVE)
        pos, neg = pair_masks(labels)
        d_pos, d_neg = d.detach()[pos], d.detach()[neg]
    stats = {"active": active, "count": len(a),
             **mean_distances(d_pos, d_neg)}
    return loss, stats


def contrastive_loss(d, same, margin):
    """(loss, active count) of pairs at Euclidean distances d (P,) with same (P,) 1/0: the mean of
    same * d^2 + (1 - same) * max(0, margin - d)^2 (Hadsell, Chopra & LeCun 2006)."""
    same = same.to(d.dtype)
    per_pair = same * d.pow(2) + (1 - same) * F.relu(margin - d).pow(2)
    if len(per_pair) == 0:
        return d.sum() * 0, 0
    return per_pair.mean(), int((per_pair > 0).sum())


def pair_loss(emb, labels, same, margin, ref=None, ref_labels=None):
    """(loss, stats) of one batch of embeddings (N, D) for the contrastive loss: the CSV batch's
    own pairs when labels is None (rows 0..B the first images, B..2B the second, `same` (B,)
    their flags), else every pair i < j of the batch, same-class or not by labels (N,); with
    references (M, D) (the batch's own rows first), every pair of a batch image and a reference
    but itself."""
    if labels is None:
        b = len(emb) // 2
        d = row_distances(emb[:b], emb[b:], "euclidean")
        same = same.to(emb.device)
    elif ref is None:
        i, j = torch.triu_indices(len(emb), len(emb), offset=1, device=emb.device)
        d = distance_matrix(emb, "euclidean")[i, j]
        same = labels[i] == labels[j]
    else:
        pos, neg = pair_masks(labels, ref_labels)
        d = distance_matrix(emb, "euclidean", ref)[pos | neg]
        same = pos[pos | neg]
    loss, active = contrastive_loss(d, same, margin)
    pos, neg = d.detach()[same.bool()], d.detach()[~same.bool()]
    return loss, {"active": active, "count": len(d),
                  **mean_distances(pos, neg)}


def neighbour_kl(student, teacher, temperature):
    """Mean over the batch's rows of KL(P_teacher(.|i) || P_student(.|i)): how far each image's
    distribution over its batch neighbours has moved from the teacher's. P(j|i) is the softmax
    over j != i of z_ij / temperature, z_ij the cosine similarity cos(x_i, x_j) standardised over
    row i (zero mean, unit variance), so only the neighbours' order and relative spacing count,
    not the scale of either space. Rows of both inputs are unit vectors; at least 3 rows."""
    n = len(student)
    eye = torch.eye(n, dtype=torch.bool, device=student.device)

    def log_p(x):
        sim = (x @ x.T).masked_fill(eye, 0)
        mean = sim.sum(1, keepdim=True) / (n - 1)
        var = (sim - mean).masked_fill(eye, 0).pow(2).sum(1, keepdim=True) / (n - 2)
        z = (sim - mean) / (var + 1e-12).sqrt()
        return F.log_softmax((z / temperature).masked_fill(eye, -1e4), dim=1)  # exp(-1e4) == 0: never oneself

    return F.kl_div(log_p(student.float()), log_p(teacher.float()), log_target=True, reduction="batchmean")


def multi_similarity_pairs(sim, pos, neg, epsilon):
    """The multi-similarity miner (Wang et al. 2019): of a batch's positive and negative pair masks
    (pair_masks), the (B, B) masks of the pairs it keeps. Anchor i keeps a positive j when S_ij -
    epsilon < its most similar negative's S, and a negative k when S_ik + epsilon > its least
    similar positive's S."""
    hardest_neg = sim.masked_fill(~neg, float("-inf")).max(1, keepdim=True).values  # (B, 1)
    hardest_pos = sim.masked_fill(~pos, float("inf")).min(1, keepdim=True).values
    return pos & (sim - epsilon < hardest_neg), neg & (sim + epsilon > hardest_pos)


def multi_similarity_loss(emb, labels, alpha, beta, base, epsilon, ref=None, ref_labels=None):
    """(loss, stats) of a P x K batch (N, D), labels (N,): the multi-similarity loss (Wang et al.
    2019) on cosine similarities S of the mined pairs, averaged over the N anchors:
    1/alpha log(1 + sum_pos exp(-alpha (S - base))) + 1/beta log(1 + sum_neg exp(beta (S - base))).
    Pairs are anchor and batch image, or with references (M, D) anchor and reference."""
    unit = F.normalize(emb.float(), dim=1)
    ref_unit = unit if ref is None else F.normalize(ref.float(), dim=1)
    sim = unit @ ref_unit.T
    pos, neg = pair_masks(labels, ref_labels)
    keep_pos, keep_neg = multi_similarity_pairs(sim.detach(), pos, neg, epsilon)
    pull = log1p_sum_exp(-alpha * (sim - base), keep_pos)
    push = log1p_sum_exp(beta * (sim - base), keep_neg)
    loss = (pull / alpha + push / beta).mean()
    return loss, {"active": int(keep_pos.sum() + keep_neg.sum()), "count": int(pos.sum() + neg.sum()),
                  **pair_distances(unit.detach(), ref_unit.detach(), pos, neg)}


def log1p_sum_exp(x, keep):
    """log(1 + sum of exp(x) over the kept entries) of each row of x (R, C), stably: logsumexp(0, ...)."""
    zero = x.new_zeros(len(x), 1)
    return torch.logsumexp(torch.cat([zero, x.masked_fill(~keep, float("-inf"))], 1), 1)


def pair_distances(unit, ref_unit, pos, neg):
    """The stats' d_pos and d_neg: mean Euclidean distance of the positive and negative pairs of unit
    rows (B, D) against reference rows (M, D)."""
    d = distance_matrix(unit, "euclidean", ref_unit)
    return mean_distances(d[pos], d[neg])


def mean_distances(d_pos, d_neg):
    """The stats' d_pos and d_neg: the means of a batch's positive and negative pair distances (nan for none)."""
    return {"d_pos": float(d_pos.mean()) if len(d_pos) else float("nan"),
            "d_neg": float(d_neg.mean()) if len(d_neg) else float("nan")}


def proxy_anchor_loss(emb, labels, proxies, alpha, delta):
    """(loss, stats) of a batch (N, D), labels (N,) in 0..C-1, against one proxy per class (C, D):
    the proxy-anchor loss (Kim et al. 2020) on cosine similarities s(x, p),
    1/|P+| sum_{p in P+} log(1 + sum_{x of p's class} exp(-alpha (s - delta)))
    + 1/C sum_p log(1 + sum_{x of other classes} exp(alpha (s + delta))), P+ the proxies with an image
    in the batch. stats' active: the images not yet nearer their own proxy than any other by 2 delta."""
    unit = F.normalize(emb.float(), dim=1)
    sim = unit @ F.normalize(proxies.float(), dim=1).T  # (N, C)
    own = F.one_hot(labels, len(proxies)).bool()
    pull = log1p_sum_exp((-alpha * (sim - delta)).T, own.T)  # (C,), per proxy over its images
    push = log1p_sum_exp((alpha * (sim + delta)).T, ~own.T)
    present = own.any(0)
    loss = pull[present].sum() / present.sum() + push.mean()
    s = sim.detach()
    nearest_other = s.masked_fill(own, float("-inf")).max(1).values
    active = int((s[own] - nearest_other < 2 * delta).sum())
    pos, neg = pair_masks(labels)
    return loss, {"active": active, "count": len(emb), **pair_distances(unit.detach(), unit.detach(), pos, neg)}
