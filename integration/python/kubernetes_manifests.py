"""Reads rendered Kubernetes manifests for integration/tests/kubernetes.rs.

    python kubernetes_manifests.py validate <rendered.yaml> <k8s version> <keda crd dir>

prints one JSON object: {"objects": [...every object...], "checked":
[{"kind", "name", "against"}], "errors": [{"kind", "name", "error"}]}.
Core objects are checked by kubernetes-validate (strict: unknown fields
refused) against the given Kubernetes version; KEDA's objects (keda.sh)
against the openAPIV3Schema of KEDA's CRDs in <keda crd dir>, made strict
the same way. An object of any other group is an error: nothing goes
unchecked.
"""

import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml


def strict(schema):
    """A structural schema that also refuses unknown fields, like the API
    server's strict field validation: every object with `properties` and
    no `additionalProperties` / `x-kubernetes-preserve-unknown-fields`
    gets `additionalProperties: false`."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schemas(crd_dir):
    """(apiVersion, kind) -> strict openAPIV3Schema, for each served version."""
    schemas = {}
    for name in sorted(os.listdir(crd_dir)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(crd_dir, name)) as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for v in crd["spec"]["versions"]:
                    if v.get("served"):
                        schema = strict(v["schema"]["openAPIV3Schema"])
                        schemas[(f"{group}/{v['name']}", kind)] = schema
    return schemas


def validate(path, version, crd_dir):
    with open(path) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    crds = crd_schemas(crd_dir)
    checked, errors = [], []
    for obj in objects:
        kind = obj.get("kind", "?")
        name = obj.get("metadata", {}).get("name", "?")
        api = obj.get("apiVersion", "?")
        try:
            if api.split("/")[0].endswith("keda.sh"):
                schema = crds.get((api, kind))
                if schema is None:
                    raise LookupError(f"no KEDA CRD schema for {api} {kind} in {crd_dir}")
                jsonschema.Draft7Validator(schema).validate(obj)
                against = f"KEDA CRD {api}"
            else:
                got = kubernetes_validate.validate(obj, version, strict=True)
                against = f"Kubernetes {got} (strict)"
            checked.append({"kind": kind, "name": name, "against": against})
        except Exception as e:  # every failure is reported, none raised
            msg = getattr(e, "message", None) or str(e)
            where = "/".join(str(p) for p in getattr(e, "absolute_path", []))
            errors.append({"kind": kind, "name": name, "error": f"{where}: {msg}"})
    print(json.dumps({"objects": objects, "checked": checked, "errors": errors}))


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "validate":
        sys.exit(__doc__)
    validate(sys.argv[2], sys.argv[3], sys.argv[4])
