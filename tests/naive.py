"""Loop-based oracles, written for clarity and nothing else."""

import math

import numpy as np


def sign(x):
    return (x > 0) - (x < 0)


def update(W, b, D, A, lr, l2=0.0, l1=0.0):
    """One SGD step with L2 decay and L1, element by element; returns new (W, b)."""
    n, n_out = D.shape
    n_in = A.shape[1]
    decay = max(0.0, 1.0 - lr * l2)
    W2 = np.array(W, dtype=np.float64)
    b2 = np.array(b, dtype=np.float64)
    for i in range(n_out):
        for j in range(n_in):
            g = 0.0
            for k in range(n):
                g += float(D[k, i]) * float(A[k, j])
            w = float(W[i, j])
            W2[i, j] = decay * w - lr * l1 * sign(w) - lr * g
        b2[i] = float(b[i]) - lr * sum(float(D[k, i]) for k in range(n))
    return W2, b2


def sigmoid(z):
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)
