# Two commands for a fresh machine:  `make demo`  (whole pipeline)  and  `make test`.
# Each creates the virtualenv first. The venv lives in a cache folder keyed by the
# requirement files' contents, so it is built once per set of requirements: its stamp depends on
# nothing else (a fresh clone's newer file times do not rebuild it), and a lock lets two clones
# that want the same venv at once build it once.
PYTHON ?= python3
REQS   := requirements.txt requirements-dev.txt requirements-faiss.txt requirements-onnx.txt \
          requirements-pretrained.txt
VENV   ?= $(HOME)/.cache/deep-ranking/venv-$(shell cat $(REQS) | sha256sum | cut -c1-16)
PY     := $(VENV)/bin/python
DEMO   ?= demo_run

.PHONY: venv test demo bench clean-demo

$(VENV)/.installed:
	mkdir -p "$(dir $(VENV))"
	flock "$(VENV).lock" sh -c 'test -f "$@" || { rm -rf "$(VENV)" && $(PYTHON) -m venv "$(VENV)" && \
		"$(PY)" -m pip install --quiet -r requirements.txt -r requirements-dev.txt && touch "$@"; }'

venv: $(VENV)/.installed

test: venv
	"$(PY)" -m ruff check .
	bash tests/install_browser.sh
	"$(PY)" -m pytest -q tests

# The whole pipeline on the embedded synthetic dataset, on CPU, ending with eval's printout.
D := $(DEMO)
demo: venv
	rm -rf "$(D)" && mkdir -p "$(D)"
	"$(PY)" synthetic_data.py --out "$(D)/data" --classes 8 --train_per_class 60 --val_per_class 15
	"$(PY)" transform_validation.py --data "$(D)/data"
	"$(PY)" triplet_sampler.py --data "$(D)/data" --training 1 --num_pos_images 2 --num_neg_images 2 \
		--out "$(D)/training_triplet_sample.csv"
	"$(PY)" triplet_sampler.py --data "$(D)/data" --training 0 --out "$(D)/val_triplet_sample.csv"
	"$(PY)" train_net.py --epochs 3 --optim adam --lr 0.0003 --backbone resnet18 --weights none \
		--trainable all --image_size 64 --embed_dim 256 --triplets "$(D)/training_triplet_sample.csv" \
		--val_triplets "$(D)/val_triplet_sample.csv" --out "$(D)/deepranknet.model"
	"$(PY)" gen_embeddings.py --model "$(D)/deepranknet.model" \
		--train_triplets "$(D)/training_triplet_sample.csv" --test_triplets "$(D)/val_triplet_sample.csv" \
		--train_out "$(D)/train_embedding.txt" --test_out "$(D)/test_embedding.txt"
	"$(PY)" eval.py --train_embeddings "$(D)/train_embedding.txt" --test_embeddings "$(D)/test_embedding.txt" \
		--train_triplets "$(D)/training_triplet_sample.csv" --test_triplets "$(D)/val_triplet_sample.csv" \
		--json "$(D)/metrics.json" --show 3 --show_dir "$(D)/ranked_imgs"

clean-demo:
	rm -rf "$(DEMO)"
