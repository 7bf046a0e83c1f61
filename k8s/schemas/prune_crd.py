"""Cut an operator's CRD down to the schema our example manifests need, for vendoring here.

    python k8s/schemas/prune_crd.py CRD.yaml VERSION EXAMPLE.yaml SOURCE > k8s/schemas/NAME.yaml

CRD.yaml is the operator's CustomResourceDefinition as released (SOURCE says where it came from:
repository, tag, commit, path); VERSION the served version the examples use; EXAMPLE.yaml the
manifests (all documents of the CRD's kind are read). What is kept of the version's
openAPIV3Schema:

- at every level an example sets something, every property *name* the operator knows, with the
  full schema (types, enums, patterns, bounds, required) of each property an example sets;
- properties no example sets: `{}` (any value), so a later edit of an example that sets one is
  not checked deeper than its name (re-run this script after such an edit);
- no `description`s, and no `x-kubernetes-validations` (CEL rules: jsonschema cannot run them).

tests/test_k8s.py validates the examples against the result, strictly: an object schema with
properties and no `additionalProperties` or `x-kubernetes-preserve-unknown-fields` refuses
unknown fields there, as the API server does with `kubectl apply --validate=strict`.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

Json = Any
DROP = {"description", "x-kubernetes-validations"}


def shape(values: list[Json]) -> Json:
    """What a set of example values uses: a dict of the keys set (merged), for lists the
    merged shape of their items, True for a scalar."""
    dicts = [v for v in values if isinstance(v, dict)]
    lists = [v for v in values if isinstance(v, list)]
    if dicts:
        keys = sorted({k for d in dicts for k in d})
        return {k: shape([d[k] for d in dicts if k in d]) for k in keys}
    if lists:
        return [shape([item for v in lists for item in v])]
    return True


def prune(schema: Json, used: Json) -> Json:
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Json] = {}
    for key, value in schema.items():
        if key in DROP:
            continue
        if key == "properties":
            out[key] = {name: prune(sub, used[name]) if isinstance(used, dict) and name in used
                        else {} for name, sub in value.items()}
        elif key == "items":
            out[key] = prune(value, used[0] if isinstance(used, list) and used else True)
        elif key == "additionalProperties" and isinstance(value, dict):
            extra = [v for k, v in used.items()] if isinstance(used, dict) else []
            out[key] = prune(value, shape(extra) if extra else True)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [prune(branch, used) for branch in value]
        else:
            out[key] = value
    return out


def main(argv: list[str]) -> int:
    crd_path, version, example_path, source = argv
    with open(crd_path) as fh:
        crd = yaml.safe_load(fh)
    with open(example_path) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d and d.get("kind") == crd["spec"][
            "names"]["kind"]]
    if not docs:
        raise SystemExit(f"no {crd['spec']['names']['kind']} in {example_path}")
    found = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not found:
        raise SystemExit(f"{crd_path} serves no version {version}")
    schema = prune(found[0]["schema"]["openAPIV3Schema"], shape(docs))
    group = crd["spec"]["group"]
    header = (
        f"# The openAPIV3Schema of {crd['spec']['names']['kind']} ({group}/{version}), cut down"
        f" for\n# {example_path} by k8s/schemas/prune_crd.py (see its doc: what is kept).\n"
        f"# Source: {source}\n")
    sys.stdout.write(header + yaml.safe_dump(
        {"apiVersion": f"{group}/{version}", "kind": crd["spec"]["names"]["kind"],
         "openAPIV3Schema": schema}, sort_keys=False, width=100))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
