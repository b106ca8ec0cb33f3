"""Pairs and triples: the sampling rules, the contrastive loss, threshold calibration and the
decision metrics, and the workflow through triplet_sampler, train_net and eval."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

import eval as evaluation
import gen_embeddings
import train_net
import triplet_sampler
from conftest import FAST, read_log
from deeprank import losses, metrics
from deeprank.common import PipelineError, run_cli
from deeprank.embedding_io import read_embeddings
from deeprank.sample_csv import read_pair_csv, read_triple_csv

LABELS = ["a"] * 6 + ["b"] * 4 + ["c"] * 1 + ["d"] * 7 + ["e"] * 5


def test_pairs_are_balanced_distinct_and_labelled_by_class():
    codes = np.unique(LABELS, return_inverse=True)[1]
    pairs, same = triplet_sampler.sample_pairs(LABELS, 40, seed=1)
    assert len(pairs) == 40 and same.sum() == 20
    assert (pairs[:, 0] != pairs[:, 1]).all()  # no self-pairs
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 40  # no pair twice, in either order
    assert ((codes[pairs[:, 0]] == codes[pairs[:, 1]]) == same.astype(bool)).all()
    uses = Counter(pairs.ravel().tolist())
    assert max(uses.values()) <= 4 * np.mean(list(uses.values())) and len(uses) >= 0.8 * len(LABELS)
    again, _ = triplet_sampler.sample_pairs(LABELS, 40, seed=1)
    assert np.array_equal(pairs, again)
    with pytest.raises(PipelineError, match=r"the split has 52; pass --count 104 or less"):
        triplet_sampler.sample_pairs(LABELS, 200, seed=0)  # more same-class pairs than exist


def test_triples_are_balanced_and_negatives_have_three_classes():
    codes = np.unique(LABELS, return_inverse=True)[1]
    triples, label = triplet_sampler.sample_triples(LABELS, 60, seed=2)
    assert len(triples) == 60 and label.sum() == 30
    classes = [len(set(codes[t].tolist())) for t in triples]
    assert all((n < 3) == bool(y) for n, y in zip(classes, label, strict=True))  # positive iff two share a class
    assert all(len(set(t)) == 3 for t in triples.tolist())
    assert len({tuple(sorted(t)) for t in triples.tolist()}) == 60
    # the shared class is not always in the same two positions
    positions = Counter(next(i for i in range(3) if codes[t[i]] == codes[t[(i + 1) % 3]])
                        for t, y in zip(triples, label, strict=True) if y and len(set(codes[t].tolist())) == 2)
    assert len(positions) == 3
    with pytest.raises(PipelineError, match="three classes"):
        triplet_sampler.sample_triples(["a"] * 4 + ["b"] * 4, 10)


def test_sampler_cli_writes_pair_and_triple_csvs(prepared_master, tmp_path):
    out = tmp_path / "pairs.csv"
    assert triplet_sampler.main(["--data", str(prepared_master), "--kind", "pairs", "--training", "0",
                                 "--count", "20", "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "image1,image2,same"
    first, second, same = read_pair_csv(out)
    assert len(first) == 20 and same.sum() == 10
    out = tmp_path / "triples.csv"
    assert triplet_sampler.main(["--data", str(prepared_master), "--kind", "triples", "--out", str(out)]) == 0
    *images, label = read_triple_csv(out)
    assert len(label) == 48 and label.sum() == 24  # default count: one per image of the split
    with pytest.raises(PipelineError, match="--kind pairs takes --count"):
        triplet_sampler.main(["--data", str(prepared_master), "--kind", "pairs", "--num_pos_images", "2"])


def test_contrastive_loss_against_its_formula():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    same = torch.tensor([1, 0, 1])
    loss, stats = losses.pair_loss(emb, None, same, margin=2.0)  # pairs (0, 3), (1, 4), (2, 5)
    x = emb.detach()
    d = [float(torch.dist(x[i], x[i + 3])) for i in range(3)]
    expected = (d[0] ** 2 + max(0.0, 2.0 - d[1]) ** 2 + d[2] ** 2) / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6) and stats["count"] == 3
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, stats = losses.pair_loss(emb, labels, None, margin=2.0)  # every pair i < j
    terms = [float(torch.dist(x[i], x[j])) ** 2 if labels[i] == labels[j]
             else max(0.0, 2.0 - float(torch.dist(x[i], x[j]))) ** 2 for i in range(6) for j in range(i + 1, 6)]
    assert float(loss.detach()) == pytest.approx(sum(terms) / 15, rel=1e-6) and stats["count"] == 15
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_threshold_calibration_and_decision_metrics_by_hand():
    # positives at 0.1, 0.3, 0.6; negatives at 0.4, 0.8, 0.9: the best cut is after 0.3 (5 of 6) or 0.6 (5 of 6)
    scores, labels = [0.1, 0.3, 0.4, 0.6, 0.8, 0.9], [1, 1, 0, 1, 0, 0]
    threshold = metrics.best_threshold(scores, labels)
    assert threshold == pytest.approx(0.35)  # the first of the two best gaps
    m = metrics.decision_metrics(scores, labels, threshold)
    assert m == {"accuracy": pytest.approx(5 / 6), "precision": 1.0, "recall": pytest.approx(2 / 3),
                 "f1": pytest.approx(0.8)}
    assert metrics.best_threshold([0.5, 0.7], [0, 0]) == 0.5  # nothing positive: below every score
    assert metrics.roc_auc(scores, labels) == pytest.approx(8 / 9)  # 8 of 9 (positive, negative) pairs ordered
    assert metrics.roc_auc([0.2, 0.2], [1, 0]) == 0.5


def test_triple_rule_on_hand_made_distances():
    a = np.array([[0.0, 0.0], [0.0, 0.0]])
    b = np.array([[3.0, 0.0], [0.0, 1.0]])
    c = np.array([[0.0, 0.5], [5.0, 5.0]])
    scores = metrics.triple_scores(a, b, c)  # smallest pairwise squared distance of each triple
    assert scores.tolist() == [0.25, 1.0]
    assert metrics.decision_metrics(scores, [1, 0], threshold=0.5)["accuracy"] == 1.0


def test_contrastive_training_and_pair_and_triple_eval(prepared_master, tmp_path, capsys):
    def sample(kind, training, count):
        out = tmp_path / f"{kind}_{training}.csv"
        assert triplet_sampler.main(["--data", str(prepared_master), "--kind", kind, "--training", str(training),
                                     "--count", str(count), "--out", str(out)]) == 0
        return out

    train_pairs, val_pairs = sample("pairs", 1, 96), sample("pairs", 0, 24)
    train_triples, val_triples = sample("triples", 1, 96), sample("triples", 0, 24)
    model = tmp_path / "c.model"
    assert train_net.main(FAST + ["--loss", "contrastive", "--pairs", str(train_pairs), "--epochs", "3",
                                  "--optim", "adam", "--trainable", "all", "--batch_size", "16",
                                  "--out", str(model)]) == 0
    log = read_log(tmp_path / "c_log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]
    online = tmp_path / "o.model"
    assert train_net.main(FAST + ["--loss", "contrastive", "--mining", "batch_all", "--data", str(prepared_master),
                                  "--classes_per_batch", "4", "--images_per_class", "3", "--max_steps", "2",
                                  "--out", str(online)]) == 0
    with pytest.raises(PipelineError, match="--mining batch_hard"):
        train_net.main(FAST + ["--loss", "contrastive", "--mining", "batch_hard", "--out", str(online)])
    emb = {split: tmp_path / f"{split}.txt" for split in ("train", "val")}
    assert gen_embeddings.main(["--model", str(model), "--data", str(prepared_master), "--train_out",
                                str(emb["train"]), "--test_out", str(emb["val"]), "--num_workers", "0"]) == 0
    files = ["--train_embeddings", str(emb["train"]), "--test_embeddings", str(emb["val"])]
    json_path = tmp_path / "m.json"
    capsys.readouterr()
    assert evaluation.main(files + ["--pairs", str(val_pairs), "--triples", str(val_triples), "--calibrate",
                                    str(train_pairs), str(train_triples), "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(json_path.read_text())
    for key in ("pair_accuracy", "pair_precision", "pair_recall", "pair_f1", "pair_roc_auc", "triple_accuracy",
                "triple_precision", "triple_recall", "triple_f1"):
        assert 0 <= result[key] <= 1 and key in printed, key
    assert result["pair_count"] == 24 and result["triple_count"] == 24
    assert result["pair_calibrated_on"] == str(train_pairs) and math.isfinite(result["pair_threshold"])
    assert result["pair_roc_auc"] > 0.5  # a trained model ranks same-class pairs closer than chance would
    with pytest.raises(PipelineError, match="needs a threshold"):
        evaluation.main(files + ["--pairs", str(val_pairs)])
    with pytest.raises(PipelineError, match="is the CSV being scored"):
        evaluation.main(files + ["--pairs", str(val_pairs), "--calibrate", str(val_pairs)])
    assert evaluation.main(files + ["--pairs", str(val_pairs), "--threshold", "0.5"]) == 0


def _decision_world(tmp_path, dim=24):
    """Train (60) and test (30) embedding files of 6 classes in tmp_path, and pair / triple CSVs over both files'
    images (a path of both files is looked up in the test file first)."""
    from deeprank.embedding_io import EmbeddingWriter
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((6, dim)).astype(np.float32)
    files = {}
    for name, count in (("train", 60), ("test", 30)):
        labels = rng.integers(0, 6, count)
        vectors = centres[labels] + rng.standard_normal((count, dim)).astype(np.float32)
        paths = [str(tmp_path / "images" / f"{name}_{i}.JPEG") for i in range(count)]
        if name == "test":
            paths[0] = files["train"][0][3]  # one image in both files
        files[name] = (paths, [f"c{x}" for x in labels], vectors)
        with EmbeddingWriter(tmp_path / f"{name}.txt", dim, False, "m") as out:
            out.write(paths, files[name][1], vectors)
    pool = [(p, lab) for name in ("test", "train") for p, lab in zip(files[name][0], files[name][1], strict=True)]
    csvs = {}
    for kind, columns, flag, count in (("pairs", 2, "same", 500), ("triples", 3, "label", 400)):
        for split in ("calibrate", "score"):
            picks = rng.integers(0, len(pool), (count, columns))
            classes = np.array([[pool[i][1] for i in row] for row in picks])
            same = ((classes[:, 0] == classes[:, 1]) if columns == 2 else
                    np.array([len(set(row)) < 3 for row in classes]))
            header = ",".join([f"image{c + 1}" for c in range(columns)] + [flag])
            lines = [",".join([pool[i][0] for i in row] + [str(int(s))]) for row, s in zip(picks, same, strict=True)]
            csvs[kind, split] = tmp_path / f"{kind}_{split}.csv"
            csvs[kind, split].write_text("\n".join([header] + lines) + "\n")
    return csvs


def _one_pass_scores(csv, folder):
    """The scores as eval computed them before chunking: each path looked up in a Python loop (test
    file first), every row's vectors stacked, one float64 pass."""
    import pandas as pd
    frame = pd.read_csv(csv, dtype=str)
    lookup = {}
    for name in ("train", "test"):  # test last: it wins for a path of both files
        embeddings = read_embeddings(folder / f"{name}.txt")
        lookup.update({p: embeddings.vectors[i] for i, p in enumerate(embeddings.paths)})
    columns = [np.stack([lookup[p] for p in frame[c]]).astype(np.float64) for c in frame.columns[:-1]]
    pairs = [((a - b) ** 2).sum(1) for a, b in
             ([(columns[0], columns[1])] if len(columns) == 2 else
              [(columns[0], columns[1]), (columns[0], columns[2]), (columns[1], columns[2])])]
    return np.minimum.reduce(pairs), frame[frame.columns[-1]].astype(int).to_numpy()


def test_chunked_pair_and_triple_scores_equal_one_pass(tmp_path):
    csvs = _decision_world(tmp_path)
    train, test = (read_embeddings(tmp_path / f"{name}.txt") for name in ("train", "test"))
    for kind in ("pairs", "triples"):
        want, labels = _one_pass_scores(csvs[kind, "score"], tmp_path)
        for chunk in (1, 24 * 3 * 5, 10 ** 9):  # one row a block, 5 rows a block, everything at once
            scores, got_labels = evaluation.decision_scores(csvs[kind, "score"], kind, train, test, chunk)
            assert np.array_equal(scores, want) and np.array_equal(got_labels, labels), (kind, chunk)
    # eval's whole printout of a calibrated run: the threshold, accuracy and AUC of the one-pass scores
    out = tmp_path / "m.json"
    assert evaluation.main(["--train_embeddings", str(tmp_path / "train.txt"), "--test_embeddings",
                            str(tmp_path / "test.txt"), "--pairs", str(csvs["pairs", "score"]), "--triples",
                            str(csvs["triples", "score"]), "--calibrate", str(csvs["pairs", "calibrate"]),
                            str(csvs["triples", "calibrate"]), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for kind, prefix in (("pairs", "pair"), ("triples", "triple")):
        threshold = metrics.best_threshold(*_one_pass_scores(csvs[kind, "calibrate"], tmp_path))
        scores, labels = _one_pass_scores(csvs[kind, "score"], tmp_path)
        assert result[f"{prefix}_threshold"] == threshold
        decided = metrics.decision_metrics(scores, labels, threshold)
        assert result[f"{prefix}_accuracy"] == decided["accuracy"] and result[f"{prefix}_f1"] == decided["f1"]
        assert 0.5 < decided["accuracy"] < 1  # the classes separate, not perfectly: the threshold matters
    assert result["pair_roc_auc"] == metrics.roc_auc(*_one_pass_scores(csvs["pairs", "score"], tmp_path))


def test_a_path_neither_embedding_file_holds_is_one_line(tmp_path, capsys):
    csvs = _decision_world(tmp_path)
    lines = csvs["pairs", "score"].read_text().splitlines()
    lost = str(tmp_path / "images" / "lost.JPEG")
    lines[300] = f"{lost},{lines[300].split(',')[1]},0"
    csvs["pairs", "score"].write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.json"
    argv = ["--train_embeddings", str(tmp_path / "train.txt"), "--test_embeddings", str(tmp_path / "test.txt"),
            "--pairs", str(csvs["pairs", "score"]), "--threshold", "1.0", "--no_knn", "--json", str(out)]
    assert run_cli(evaluation.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {csvs['pairs', 'score']} names {lost}, which neither embedding file holds; rerun "
                   f"gen_embeddings.py on the split it comes from"]
    assert not out.exists()


def test_no_knn_decides_pairs_alone_and_one_file_serves_both_sides(tmp_path):
    import pandas as pd
    csvs = _decision_world(tmp_path)
    rows = pd.read_csv(csvs["pairs", "score"])
    rows = rows[rows.image1.str.contains("/train_") & rows.image2.str.contains("/train_")]
    rows.to_csv(tmp_path / "train_pairs.csv", index=False)
    out = tmp_path / "m.json"
    both = str(tmp_path / "train.txt")
    assert evaluation.main(["--train_embeddings", both, "--test_embeddings", both, "--pairs",
                            str(tmp_path / "train_pairs.csv"), "--threshold", "40", "--no_knn", "--json",
                            str(out)]) == 0
    result = json.loads(out.read_text())
    assert "map_at_r" not in result and "precision_at_1" not in result and result["pair_count"] == len(rows) > 100


def test_sampler_messages_say_the_fix(prepared_master, tmp_path):
    out = tmp_path / "p.csv"
    with pytest.raises(PipelineError, match=r"the split has \d+; pass --count \d+ or less"):
        triplet_sampler.main(["--data", str(prepared_master), "--kind", "pairs", "--count", "100000",
                              "--out", str(out)])
    one_class = tmp_path / "one.csv"
    one_class.write_text("filename,label\n" + "".join(f"{p},a\n" for p in list(prepared_master.rglob("*.JPEG"))[:8]))
    with pytest.raises(PipelineError, match="pairs need at least 2 classes"):
        triplet_sampler.main(["--data", str(one_class), "--kind", "pairs", "--out", str(out)])
