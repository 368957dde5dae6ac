"""Random dReLU / ReGLU / ReLU-MLP FFN weights with a low-rank predictor, as the kernel tests draw them."""
import torch


def random_ffn(gen, rows, hidden, intermediate, out, dtype, device="cpu", bias=False, kind="drelu", rank=8):
    """{x, gw, gb, uw, ub, dw, db, p_in, p_out, p_b}: weights scaled like trained ones (1/sqrt(fan-in)), biases
    only with `bias`, no up projection for kind relu_mlp."""
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    return dict(x=r(rows, hidden), gw=r(intermediate, hidden, scale=hidden**-0.5),
                gb=r(intermediate, scale=0.1) if bias else None,
                uw=r(intermediate, hidden, scale=hidden**-0.5) if kind != "relu_mlp" else None,
                ub=r(intermediate, scale=0.1) if bias and kind != "relu_mlp" else None,
                dw=r(out, intermediate, scale=intermediate**-0.5), db=r(out, scale=0.1) if bias else None,
                p_in=r(rank, hidden, scale=hidden**-0.5), p_out=r(intermediate, rank, scale=rank**-0.5),
                p_b=r(intermediate, scale=0.1) if bias else None)
