#!/usr/bin/env python3
"""Random-interleaving model of kernels/grouped_gemm.cu's EPI_RING protocol (`python3 scripts/ring-model.py [N]`): one producer thread, 2 warpgroups x 4 consumer warps,
STAGES stages with full (count 1 + tx) and empty (count 8) mbarriers (phase parity semantics), per tile num_kb k-steps then 2 skipped
stages for the epilogue; consumer release of stage kb-1 after issuing kb (wgmma in flight), deferred epilogue release by warp 0 after
the next tile's first k-step issue (after its bulk copy read completes, modelled as an async event). Checks over N random
schedules (and the 3-stage ring without the epilogue's stages): no deadlock, no stage loaded by the TMA or written as staging
while a wgmma or a bulk copy still reads it, every k-step reads its own data. It found (by construction) that the deferred
release must come after the next tile's first k-step, not at its end (a deadlock with 4 stages), and that a warp must wait on
a stage's full barrier before releasing it. A model, not the kernel: keep the two in step when either changes."""
import random, sys

class Bar:
    def __init__(s, count): s.count = count; s.pending = count; s.phase = 0; s.tx = 0
    def arrive(s, tx=0):
        s.tx += tx; s.pending -= 1; assert s.pending >= 0, 'too many arrivals in a phase'; s._check()
    def complete_tx(s, b): s.tx -= b; s._check()
    def _check(s):
        if s.pending == 0 and s.tx == 0: s.phase ^= 1; s.pending = s.count
    def done(s, parity): return s.phase != parity   # try_wait.parity: the phase with this parity has completed

def run(seed, STAGES=4, tiles=None, ring=True):
    rng = random.Random(seed)
    tiles = tiles or [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(1, 6))]
    full = [Bar(1) for _ in range(STAGES)]; empty = [Bar(8) for _ in range(STAGES)]
    content = [None] * STAGES   # what a stage holds: ('k', tile, kb) / ('stage', tile, wg) / None
    readers = [set() for _ in range(STAGES)]  # who may still read the stage (consumers' wgmma, bulk copies)
    inflight_tma = []  # (stage, tag)
    inflight_copy = []  # (warp, stage)
    def producer():
        st, ph = 0, 0
        for t, nk in enumerate(tiles):
            for kb in range(nk):
                while not empty[st].done(ph ^ 1): yield
                assert not readers[st], f'producer loads into stage {st} still read by {readers[st]}'
                full[st].arrive(tx=48)
                inflight_tma.append((st, ('k', t, kb)))
                st += 1
                if st == STAGES: st, ph = 0, ph ^ 1
                yield
            if ring:
                for _ in range(2):
                    while not empty[st].done(ph ^ 1): yield
                    assert not readers[st], f'producer skips stage {st} still read by {readers[st]}'
                    content[st] = None
                    full[st].arrive()
                    st += 1
                    if st == STAGES: st, ph = 0, ph ^ 1
                    yield
    def consumer(wg, warp):
        me = (wg, warp); st, ph = 0, 0; pending = None
        def release(s): empty[s].arrive()
        def release_pending():
            nonlocal pending
            if pending is not None:
                while any(c == (me, pending) for c in inflight_copy): yield
                release(pending); pending = None
        for t, nk in enumerate(tiles):
            prev = None
            for kb in range(nk):
                while not full[st].done(ph): yield
                assert content[st] == ('k', t, kb), f'{me} reads {content[st]} in stage {st}, wants {("k", t, kb)}'
                readers[st].add(me)   # its wgmma reads the stage until wait_group retires it
                yield
                if kb == 0: yield from release_pending()
                if prev is not None: readers[prev].discard(me); release(prev)
                prev = st
                st += 1
                if st == STAGES: st, ph = 0, ph ^ 1
                yield
            if prev is not None: readers[prev].discard(me); release(prev)
            yield from release_pending()
            if ring:
                mine = other = None
                for i in range(2):
                    while not full[st].done(ph): yield
                    if i == wg: mine = st
                    else: other = st
                    st += 1
                    if st == STAGES: st, ph = 0, ph ^ 1
                release(other)
                # write the staging rows (a generic write: nobody else may be reading or loading it)
                assert content[mine] in (None, ('stage', t, wg)), f'{me} stages into stage {mine} holding {content[mine]}'
                content[mine] = ('stage', t, wg); readers[mine].add(me); yield; readers[mine].discard(me)
                if warp == 0:
                    inflight_copy.append((me, mine)); readers[mine].add(('copy', wg)); pending = mine
                else: release(mine)
                yield
    gens = [producer()] + [consumer(w, k) for w in range(2) for k in range(4)]
    alive = list(range(len(gens)))
    steps = 0
    while alive or inflight_tma or inflight_copy:
        steps += 1
        if steps > 200000: raise AssertionError(f'no progress (deadlock?) tiles {tiles}')
        # async engines
        if inflight_tma and rng.random() < 0.3:
            s, tag = inflight_tma.pop(rng.randrange(len(inflight_tma)))
            assert not readers[s], f'TMA writes stage {s} while {readers[s]} read it'
            content[s] = tag; full[s].complete_tx(48)
        if inflight_copy and rng.random() < 0.3:
            me, s = inflight_copy.pop(rng.randrange(len(inflight_copy)))
            readers[s].discard(('copy', me[0]))
        if not alive: continue
        i = rng.choice(alive)
        try: next(gens[i])
        except StopIteration: alive.remove(i)
    return tiles

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
for seed in range(n):
    run(seed)
    run(seed, STAGES=3, ring=False)
print(f'{n} random schedules: no deadlock, no stage loaded or staged while read, every k-step read its own data')
