"""Writes test/fixtures/optim/adamw.json: torch.optim.AdamW's weights after a few steps (with
torch.nn.utils.clip_grad_norm_ before each), float64 and float32, for test/optim.test.ts.
Run by hand in a venv with torch (`python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install
torch`): `/tmp/hfvenv/bin/python scripts/optim_fixture.py`. Never run in CI."""
import json, os
import torch

torch.manual_seed(7)
cases = []
for name, cfg in [
    ('plain', dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_norm=None, steps=4)),
    ('decay-clip', dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, max_norm=0.5, steps=5)),
    ('big-lr-no-clip-hit', dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, max_norm=1e6, steps=3)),
]:
    shapes = {'w': [3, 5], 'b': [5], 'x': [2, 3, 4]}
    # float32 values (so that both runs start from what the test starts from)
    init = {k: torch.randn(s).to(torch.float64) for k, s in shapes.items()}
    grads = [{k: (torch.randn(s) * (0.5 + i)).to(torch.float64) for k, s in shapes.items()} for i in range(cfg['steps'])]
    out = {}
    for dtype in ('float64', 'float32'):
        dt = getattr(torch, dtype)
        # weight decay on the 2-d and 3-d tensors only (our default: biases are not decayed)
        ps = {k: torch.nn.Parameter(v.to(dt).clone()) for k, v in init.items()}
        groups = [
            {'params': [ps['w'], ps['x']], 'weight_decay': cfg['weight_decay']},
            {'params': [ps['b']], 'weight_decay': 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=cfg['lr'], betas=cfg['betas'], eps=cfg['eps'], foreach=False)
        norms = []
        for g in grads:
            for k, p in ps.items():
                p.grad = g[k].to(dt).clone()
            if cfg['max_norm'] is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(list(ps.values()), cfg['max_norm'])))
            opt.step()
        out[dtype] = {'params': {k: p.detach().to(torch.float64).flatten().tolist() for k, p in ps.items()}, 'norms': norms}
    cases.append({
        'name': name,
        'options': {'lr': cfg['lr'], 'beta1': cfg['betas'][0], 'beta2': cfg['betas'][1], 'eps': cfg['eps'], 'weightDecay': cfg['weight_decay'],
                    **({'maxGradNorm': cfg['max_norm']} if cfg['max_norm'] is not None else {})},
        'shapes': shapes,
        'init': {k: v.flatten().tolist() for k, v in init.items()},
        'grads': [{k: v.flatten().tolist() for k, v in g.items()} for g in grads],
        'torch': out,
    })
path = os.path.join(os.path.dirname(__file__), '..', 'test', 'fixtures', 'optim', 'adamw.json')
with open(path, 'w') as f:
    json.dump({'generator': 'scripts/optim_fixture.py', 'torch': torch.__version__, 'cases': cases}, f)
print('wrote', path)
