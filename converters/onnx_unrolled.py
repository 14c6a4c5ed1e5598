"""The dynamo exporter's unrolled ``nn.RNN``, folded back into ONNX ``RNN`` nodes.

torch's dynamo exporter writes ``nn.RNN`` (not LSTM or GRU) as one MatMul/Add/Tanh group per time step.
`fold_unrolled_rnns` rewrites each such chain back into the ONNX ``RNN`` node it computes (two chains
concatenated on the features, one reading the time-reversed input, become one bidirectional node), so the
importer (`edgernn.converters.onnx_import`) only ever reads recurrent operators. A chain that does not
match exactly is left as it is, and the importer then refuses its first node it cannot read.
"""

from __future__ import annotations

import logging

import numpy as np

from .onnx_graph import BIG, GraphIndex, is_zero

log = logging.getLogger(__name__)

_ACTS = {"Tanh": "Tanh", "Relu": "Relu"}


def _step_input(g: GraphIndex, name):
    """``name`` = Squeeze(Slice(P, t, t+1, axis 0), 0) or Gather(P, t, axis 0) -> (P, t, nodes) or None."""
    gather = g.node(name, "Gather")
    if gather is not None and g.attr(gather, "axis", 0) == 0 and g.const(gather.input[1]) is not None \
            and g.const(gather.input[1]).ndim == 0:
        return gather.input[0], int(g.const(gather.input[1])), [gather]
    squeeze = g.node(name, "Squeeze")
    if squeeze is None or len(squeeze.input) < 2 or g.ints(squeeze.input[1]) != [0]:
        return None
    sl = g.node(squeeze.input[0], "Slice")
    if sl is None:
        return None
    starts, ends = g.ints(sl.input[1]), g.ints(sl.input[2])
    axes = g.ints(sl.input[3]) if len(sl.input) > 3 and sl.input[3] else [0]
    steps = g.ints(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else [1]
    if starts is None or ends is None or axes != [0] or steps != [1] or ends[0] != starts[0] + 1 or starts[0] < 0:
        return None
    return sl.input[0], starts[0], [sl, squeeze]


def _step(g: GraphIndex, act):
    """One unrolled step ``h = act(u_t + (h_prev @ Rt + rb))`` -> a dict, or None."""
    node = g.node(act.input[0], "Add")
    operands = list(node.input) if node is not None else [None, act.input[0]]
    for first, second in ((0, 1), (1, 0)):
        found = _step_input(g, operands[second]) if operands[second] else None
        if found is None:
            continue
        P, t, nodes = found
        step = dict(act=act, P=P, t=t, nodes=nodes + [act] + ([node] if node is not None else []),
                    prev=None, Rt=None, rb=None, start=None)
        other = operands[first]
        if other is None:
            step["start"] = np.zeros(1, np.float32)
            return step
        if g.const(other) is not None:
            step["start"] = g.const(other)
            return step
        rec = g.affine(other)
        if rec is not None and is_zero(g, rec[0]):  # the first step, from a zero state built at run time
            step["start"] = np.zeros(rec[1].shape[1], np.float32) if rec[2] is None else rec[2]
            step["nodes"] += rec[3]
            return step
        if rec is None or g.node(rec[0], *_ACTS) is None:
            return None
        step["prev"], step["Rt"], step["rb"] = rec[0], rec[1], rec[2]
        step["nodes"] += rec[3]
        return step
    return None


def _chains(g: GraphIndex):
    """Every maximal chain of unrolled steps, in time order of computation."""
    steps = {}
    for node in g.nodes:
        if node.op_type in _ACTS and node.domain in ("", "ai.onnx"):
            step = _step(g, node)
            if step is not None:
                steps[node.output[0]] = step
    following: dict[str, list] = {}
    for out, step in steps.items():
        if step["prev"] is not None:
            following.setdefault(step["prev"], []).append(out)
    chains = []
    for out, step in steps.items():
        if step["prev"] is not None:
            continue
        chain = [step]
        while len(following.get(chain[-1]["act"].output[0], [])) == 1:
            chain.append(steps[following[chain[-1]["act"].output[0]][0]])
        chains.append(chain)
    return chains


def _read_chain(g: GraphIndex, chain):
    """Check a chain is one RNN direction over its whole input; -> description dict, or None."""
    first, rest = chain[0], chain[1:]
    if len(chain) < 2:
        return None  # a single step never multiplies by R: the recurrent weights cannot be recovered
    act = first["act"].op_type
    Rt, rb = rest[0]["Rt"], rest[0]["rb"]
    for t, step in enumerate(chain):
        if step["P"] != first["P"] or step["t"] != t or step["act"].op_type != act:
            return None
        if step is not first and (not np.array_equal(step["Rt"], Rt) or
                                  (step["rb"] is None) != (rb is None) or
                                  (rb is not None and not np.array_equal(step["rb"], rb))):
            return None
    H = Rt.shape[1]
    if Rt.shape != (H, H):
        return None
    expected = np.zeros(H, np.float32) if rb is None else np.asarray(rb, np.float32).reshape(-1)
    start = np.asarray(first["start"], np.float32)
    if start.shape[-1:] not in ((H,), (1,)) or not np.allclose(start, expected, rtol=0, atol=1e-7):
        return None  # a non-zero initial state was folded in: not ours to guess
    P, nodes, reverse = first["P"], [n for s in chain for n in s["nodes"]], False
    flip = g.node(P, "Slice")
    if flip is not None:
        starts, ends = g.ints(flip.input[1]), g.ints(flip.input[2])
        axes = g.ints(flip.input[3]) if len(flip.input) > 3 else None
        steps = g.ints(flip.input[4]) if len(flip.input) > 4 else None
        if starts != [-1] or axes != [0] or steps != [-1] or ends is None or ends[0] > -BIG:
            return None
        P, reverse, nodes = flip.input[0], True, nodes + [flip]
    projection = g.affine(P)
    if projection is None or projection[1].shape[1] != H:
        return None
    S, Wt, wb, more = projection
    outs = [s["act"].output[0] for s in chain]
    cat = None
    for consumer in g.consumers.get(outs[0], []):
        order = outs[::-1] if reverse else outs
        if consumer.op_type == "Concat" and list(consumer.input) == order and g.attr(consumer, "axis") == 0:
            cat = consumer
    return dict(S=S, W=Wt.T, R=Rt.T, wb=wb, rb=rb, act=act, reverse=reverse, H=H, cat=cat,
                last=outs[-1], nodes=nodes + more + ([cat] if cat is not None else []))


def fold_unrolled_rnns(nodes, constants, outputs):
    """-> (nodes, new constants): every unrolled RNN chain replaced by the RNN node it computes."""
    from onnx import helper

    g = GraphIndex(list(nodes), constants, outputs)
    found = [c for c in (_read_chain(g, chain) for chain in _chains(g)) if c is not None]
    if not found:
        return list(nodes), {}
    pairs, singles = [], list(found)
    for node in g.nodes:  # forward and reverse chains over one input, concatenated on the features
        if node.op_type != "Concat" or len(node.input) != 2 or g.attr(node, "axis") not in (2, -1):
            continue
        fwd = next((c for c in singles if c["cat"] is not None and c["cat"].output[0] == node.input[0]), None)
        rev = next((c for c in singles if c["cat"] is not None and c["cat"].output[0] == node.input[1]), None)
        if fwd and rev and not fwd["reverse"] and rev["reverse"] and fwd["S"] == rev["S"] and \
                fwd["act"] == rev["act"] and fwd["H"] == rev["H"] and (fwd["wb"] is None) == (rev["wb"] is None):
            singles.remove(fwd)
            singles.remove(rev)
            pairs.append((node, fwd, rev))
    new_constants, removed = {}, set()

    def const(name, value):
        name = f"_edgernn_unrolled_{len(new_constants)}_{name}"
        new_constants[name] = np.ascontiguousarray(value)
        return name

    def recurrent(parts, direction, outputs_):
        H, biased = parts[0]["H"], parts[0]["wb"] is not None or parts[0]["rb"] is not None
        W = np.stack([p["W"] for p in parts]).astype(np.float32)
        R = np.stack([p["R"] for p in parts]).astype(np.float32)
        inputs = [parts[0]["S"], const("W", W), const("R", R)]
        if biased:
            zeros = np.zeros(H, np.float32)
            B = np.stack([np.concatenate([np.ravel(p["wb"]) if p["wb"] is not None else zeros,
                                          np.ravel(p["rb"]) if p["rb"] is not None else zeros]) for p in parts])
            inputs.append(const("B", B.astype(np.float32)))
        return helper.make_node("RNN", inputs, outputs_, hidden_size=H, direction=direction,
                                activations=[parts[0]["act"]] * len(parts))

    groups = [([c], c["cat"].output[0] if c["cat"] is not None else None, None) for c in singles]
    groups += [([fwd, rev], concat.output[0], concat) for concat, fwd, rev in pairs]
    plans = []
    for parts, y_name, concat in groups:
        used = {n.output[0] for p in parts for n in p["nodes"]} | ({concat.output[0]} if concat else set())
        keep = {p["last"] for p in parts} | ({y_name} if y_name else set())
        inner = [n for n in g.nodes if n.output and n.output[0] in used]
        leaks = [out for n in inner for out in n.output if out not in keep and
                 (out in g.outputs or any(c.output[0] not in used for c in g.consumers.get(out, [])))]
        if leaks:
            log.debug("unrolled RNN over %r not folded: %s used elsewhere", parts[0]["S"], leaks[0])
            continue
        k = len(plans)
        Y, Yh = f"_edgernn_unrolled_{k}_Y", f"_edgernn_unrolled_{k}_Yh"
        new = [recurrent(parts, "bidirectional" if concat else ("reverse" if parts[0]["reverse"] else "forward"),
                         [Y, Yh])]
        if concat is None:
            if y_name:
                new.append(helper.make_node("Squeeze", [Y, const("axes", np.array([1], np.int64))], [y_name]))
            new.append(helper.make_node("Identity", [Yh], [parts[0]["last"]]))
        else:
            new.append(helper.make_node("Transpose", [Y], [Y + "_t"], perm=[0, 2, 1, 3]))
            new.append(helper.make_node("Reshape", [Y + "_t", const("shape", np.array([0, 0, -1], np.int64))],
                                        [y_name]))
            for d, part in enumerate(parts):
                new.append(helper.make_node("Slice", [Yh, const("start", np.array([d], np.int64)),
                                                      const("end", np.array([d + 1], np.int64)),
                                                      const("axis", np.array([0], np.int64))], [part["last"]]))
        first = min(i for i, n in enumerate(g.nodes) if n.output and n.output[0] in used)
        plans.append((first, new))
        removed |= {id(n) for n in inner}
        log.info("read an unrolled %s RNN (%d steps) over %r as one %s RNN node", parts[0]["act"],
                 sum(1 for n in parts[0]["nodes"] if n.op_type in _ACTS),
                 parts[0]["S"], "bidirectional" if concat else ("reverse" if parts[0]["reverse"] else "forward"))
    result, inserts = [], {}
    for first, new in plans:
        inserts.setdefault(first, []).extend(new)
    for i, node in enumerate(g.nodes):
        result.extend(inserts.get(i, []))
        if id(node) not in removed:
            result.append(node)
    return result, new_constants
