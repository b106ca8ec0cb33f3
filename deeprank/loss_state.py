"""What a loss keeps from step to step, beside the model: the proxy-anchor loss's proxies (one
learned vector per class, trained by the optimiser at their own learning rate) and cross-batch
memory (Wang et al. 2020, "Cross-Batch Memory for Embedding Learning": the last N embeddings
and their labels, as more references than one batch holds). Both go into checkpoints, so that
--resume continues exactly.

    state = LossState.create(args, classes, embed_dim, device, ckpt)
    ref, ref_labels = state.memory.references(emb, labels)   # the batch's own rows first
    state.memory.push(emb, labels)                            # after the step
"""

import torch

from deeprank.common import PipelineError


class CrossBatchMemory:
    """A queue of the last `size` embeddings (detached, fp32) and labels, newest first."""

    def __init__(self, size, embed_dim, device):
        self.size = size
        self.embeddings = torch.zeros(0, embed_dim, device=device)
        self.labels = torch.zeros(0, dtype=torch.long, device=device)

    def references(self, emb, labels):
        """(ref (M, D), ref_labels (M,)) of a step: the batch's rows (detached) then the queue, at most
        `size` rows in all (the batch's own are never cut)."""
        keep = max(0, self.size - len(emb))
        return (torch.cat([emb.detach().float(), self.embeddings[:keep]]),
                torch.cat([labels, self.labels[:keep]]))

    def push(self, emb, labels):
        """Enqueue a step's batch (the global batch under torchrun: every rank keeps the same queue);
        the oldest rows beyond `size` leave."""
        self.embeddings = torch.cat([emb.detach().float(), self.embeddings])[:self.size]
        self.labels = torch.cat([labels, self.labels])[:self.size]

    def state_dict(self):
        return {"size": self.size, "embeddings": self.embeddings.cpu(), "labels": self.labels.cpu()}

    def load_state_dict(self, state, path):
        if state["size"] != self.size or state["embeddings"].shape[1] != self.embeddings.shape[1]:
            raise PipelineError(f"{path} holds a memory of {state['size']} x {state['embeddings'].shape[1]}, not "
                                f"--memory {self.size} x {self.embeddings.shape[1]}; resume with the run's flags")
        device = self.embeddings.device
        self.embeddings, self.labels = state["embeddings"].to(device), state["labels"].to(device)


class LossState:
    """The proxies (a Parameter (classes, D), or None) and the memory (or None) of one run."""

    def __init__(self, proxies=None, memory=None):
        self.proxies, self.memory = proxies, memory

    @classmethod
    def create(cls, args, classes, embed_dim, device, ckpt=None):
        """The state of a run's flags: proxies for --loss proxy_anchor (Kaiming-normal, drawn from
        --seed, as Kim et al. initialise them), memory for --memory N; with --resume's checkpoint, its
        saved state."""
        proxies = memory = None
        if args.loss == "proxy_anchor":
            weights = torch.empty(classes, embed_dim)
            torch.nn.init.kaiming_normal_(weights, mode="fan_out", generator=torch.Generator().manual_seed(args.seed))
            proxies = torch.nn.Parameter(weights.to(device))
        if args.memory:
            memory = CrossBatchMemory(args.memory, embed_dim, device)
        state = cls(proxies, memory)
        if ckpt is not None:
            state.load(ckpt.get("loss_state") or {}, args.resume)
        return state

    def parameter_groups(self, lr):
        """The optimiser group of the proxies, at their own learning rate (none without proxies)."""
        return [] if self.proxies is None else [{"params": [self.proxies], "lr": lr}]

    def unscale_grad(self, scale):
        """Under torchrun every rank computes the proxies' gradient of the whole global batch (the same
        everywhere), and nothing averages it over ranks: undo the loss's grad_scale on it."""
        if self.proxies is not None and self.proxies.grad is not None and scale != 1:
            self.proxies.grad.div_(scale)

    def state_dict(self):
        """The checkpoint's "loss_state": plain tensors only."""
        state = {}
        if self.proxies is not None:
            state["proxies"] = self.proxies.detach().cpu()
        if self.memory is not None:
            state["memory"] = self.memory.state_dict()
        return state

    def load(self, state, path):
        """Take a checkpoint's saved state; one that lacks what this run's flags need is refused."""
        for name, needed in (("proxies", self.proxies is not None), ("memory", self.memory is not None)):
            if needed and name not in state:
                raise PipelineError(f"{path} has no saved {name} (it was trained without --loss proxy_anchor / "
                                    f"--memory); resume with the run's flags")
        if self.proxies is not None:
            if state["proxies"].shape != self.proxies.shape:
                raise PipelineError(f"{path} holds {tuple(state['proxies'].shape)} proxies, this run's data and "
                                    f"--embed_dim need {tuple(self.proxies.shape)}; resume with the run's flags")
            with torch.no_grad():
                self.proxies.copy_(state["proxies"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"], path)
