"""Small helpers shared by the tests."""


class NoOpOptimizer:
    """Stands in for an optimizer so that a test can read the gradients a step produced."""

    def zero_grad(self, set_to_none: bool = True):
        pass

    def step(self):
        pass


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
