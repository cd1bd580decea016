"""Public benchmarks the four papers report, one module per family, one registry."""

from lvlm_jax.eval.benchmarks import cadvi, chair, choices, mme, pope, refcoco, vqa

BENCHMARKS = {
    "pope": pope.POPE,
    "mme": mme.MME,
    "gqa": vqa.GQA,
    "textvqa": vqa.TEXTVQA,
    "scienceqa": choices.SCIENCEQA,
    "mmbench": choices.MMBENCH,
    "seed": choices.SEED,
    "chair": chair.CHAIR,
    "refcoco": refcoco.REFCOCO,
    "bison": cadvi.BISON,
    "svo_probes": cadvi.SVO_PROBES,
    "nlvr2": cadvi.NLVR2,
    "eqben": cadvi.EQBEN,
    "cola": cadvi.COLA,
    "cadqa": cadvi.CADQA,
}
