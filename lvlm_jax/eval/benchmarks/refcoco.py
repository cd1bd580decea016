"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding (REC Acc@0.5), and SC-Tune's
self-consistency Acc@0.5 over the same boxes, through the grounding-file evaluator
(`lvlm_jax/eval/grounding_file.py`: the config's grounding prompt and box format).

Files: the REC JSONL splits Qwen-VL publishes (`refcoco_{val,testA,testB}.jsonl`,
`refcoco+_{val,testA,testB}.jsonl`, `refcocog_{val,test}.jsonl`; the files InternVL's and
Qwen-VL's evaluations read): one object a line with `image` (a path, e.g.
"coco/train2014/COCO_train2014_000000581857.jpg"), `sent`, `bbox` [x1, y1, x2, y2] in pixels,
`width`, `height`; --images the folder the paths are relative to. (The original refs(unc).p
files are pickles, which lvlm_jax does not load.) A record whose image is missing is a counted
skip. Images are decoded batch by batch as they are asked (`eval/benchmarks/evaluation.py`),
never all at once.
"""

from lvlm_jax.data.images import BadImage, resolve_image_path
from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import files
from lvlm_jax.eval.benchmarks.benchmark import GroundingBenchmark
from lvlm_jax.input_files import read_jsonl


def records(data: str, images: str | None, limit: int = 0) -> tuple[list[dict], list[str]]:
  root = files.folder(images, data)
  rows = read_jsonl(data, "REC rows: image, sent, bbox [x1, y1, x2, y2], width, height")
  out, skipped = [], []
  for number, row in rows[:limit or None]:
    where = f"{data}:{number}"
    box = files.field(row, "bbox", where, list)
    width = files.field(row, "width", where, (int, float))
    height = files.field(row, "height", where, (int, float))
    if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) or width <= 0 \
        or height <= 0:
      raise UserError(f"{where}: 'bbox' must be 4 pixel numbers [x1, y1, x2, y2] and "
                      "'width'/'height' positive")
    expression = files.field(row, "sent", where)
    try:
      image = resolve_image_path(files.field(row, "image", where), [root])
    except BadImage as e:
      skipped.append(f"{where}: {e}")
      continue
    x1, y1, x2, y2 = box
    out.append({"id": str(number), "image": image, "expression": expression,
                "box": [x1 / width, y1 / height, x2 / width, y2 / height]})
  return out, skipped


REFCOCO = GroundingBenchmark(records, "Qwen-VL's refcoco{,+,g}_<split>.jsonl; --images the "
                             "folder its image paths are relative to")
