"""A small kustomize (v5) for integration/tests/kubernetes.rs: renders the
kustomizations of deploy/kubernetes without a kustomize binary.

    python kustomize_render.py build <kustomization dir>   # YAML stream
    python kustomize_render.py objects <rendered.yaml>     # JSON array

It implements exactly what deploy/kubernetes uses and refuses loudly
anything else (an unknown kustomization field, generator option, patch
form or strategic-merge list), so a changed manifest cannot be silently
mis-rendered:

- Kustomization (kustomize.config.k8s.io/v1beta1) and Component
  (v1alpha1) with `resources` (files and directories), `components`,
  `namespace`, `images` (name, newName, newTag, digest), `patches` (a
  strategic-merge patch, inline or by `path`, matched by kind and name;
  `$patch: delete` of a whole object; lists merged by their Kubernetes
  merge key: containers, env, volumes, volumeMounts, ...),
  `configMapGenerator` and `secretGenerator` with `files` (`key=path` or
  `path`), Secret `type`, and `options.disableNameSuffixHash` (required
  on Secrets);
- the name-hash suffix of generated ConfigMaps (kustomize's: sha256 of
  the JSON {data, kind, name: ""}, 10 characters, some letters swapped), and the rewriting of the references to them in pod
  templates (volumes, projected volumes, envFrom, env valueFrom).

The test renders with a real kustomize too when one is on PATH and
asserts both renderings hold the same objects.
"""

import base64
import hashlib
import json
import os
import sys

import yaml

KINDS = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("kustomize.config.k8s.io/v1alpha1", "Component"),
}
FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "images",
    "patches",
    "configMapGenerator",
    "secretGenerator",
}
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

# Kinds kustomize treats as cluster-scoped (no namespace set on them).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "APIService",
    "RuntimeClass",
}
# Kinds whose namespace transform kustomize does more for (subjects):
# not implemented.
REFUSED_KINDS = {"RoleBinding", "ClusterRoleBinding", "ValidatingWebhookConfiguration",
                 "MutatingWebhookConfiguration", "APIService", "CustomResourceDefinition"}

# Where the pod spec lives in each workload kind.
POD_SPEC = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")

# Strategic-merge lists merged by key (Kubernetes' patchMergeKey); a
# patch holding any other list is refused.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class Refused(Exception):
    pass


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def read_kustomization(d):
    found = [n for n in KUSTOMIZATION_FILES if os.path.isfile(os.path.join(d, n))]
    if len(found) != 1:
        raise Refused(f"{d}: expected exactly one of {KUSTOMIZATION_FILES}, found {found}")
    path = os.path.join(d, found[0])
    docs = load_yaml_docs(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise Refused(f"{path}: not a single YAML mapping")
    k = docs[0]
    if (k.get("apiVersion"), k.get("kind")) not in KINDS:
        raise Refused(f"{path}: apiVersion/kind {k.get('apiVersion')}/{k.get('kind')} not implemented")
    unknown = sorted(set(k) - FIELDS)
    if unknown:
        raise Refused(f"{path}: field(s) {unknown} not implemented by this renderer")
    return path, k


def ident(obj):
    group = obj.get("apiVersion", "").rpartition("/")[0]
    meta = obj.get("metadata") or {}
    return (group, obj.get("kind"), meta.get("namespace"), meta.get("name"))


def add(objects, new, where):
    have = {ident(o) for o in objects}
    for o in new:
        if not isinstance(o, dict) or "kind" not in o or "metadata" not in o:
            raise Refused(f"{where}: not a Kubernetes object: {o!r:.200}")
        if o["kind"] in REFUSED_KINDS:
            raise Refused(f"{where}: kind {o['kind']} not implemented by this renderer")
        if ident(o) in have:
            raise Refused(f"{where}: {ident(o)} defined twice")
        have.add(ident(o))
        objects.append(o)


def build(d, want_kind="Kustomization"):
    """The objects of the kustomization in directory d."""
    path, k = read_kustomization(d)
    if k["kind"] != want_kind:
        raise Refused(f"{path}: a {k['kind']} where a {want_kind} was expected")
    objects, generated = [], set()
    for r in k.get("resources") or []:
        p = os.path.normpath(os.path.join(d, r))
        if "://" in r or r.startswith("git@"):
            raise Refused(f"{path}: remote resource {r} not implemented")
        if os.path.isdir(p):
            sub, sub_generated = build(p)
            add(objects, sub, p)
            generated |= sub_generated
        elif os.path.isfile(p):
            add(objects, load_yaml_docs(p), p)
        else:
            raise Refused(f"{path}: resource {r} does not exist")
    return apply_own(d, path, k, objects, generated)


def apply_own(d, path, k, objects, generated):
    """Components, generators, then transformers (kustomize's order:
    namespace, patches, images) of kustomization k onto objects."""
    for c in k.get("components") or []:
        p = os.path.normpath(os.path.join(d, c))
        if not os.path.isdir(p):
            raise Refused(f"{path}: component {c} is not a directory")
        cpath, ck = read_kustomization(p)
        if ck["kind"] != "Component":
            raise Refused(f"{cpath}: a {ck['kind']} listed under components")
        # A component's resources join the parent's, then its own
        # generators and transformers run over all of them.
        for r in ck.get("resources") or []:
            rp = os.path.normpath(os.path.join(p, r))
            if os.path.isdir(rp):
                sub, sub_generated = build(rp)
                add(objects, sub, rp)
                generated |= sub_generated
            elif os.path.isfile(rp):
                add(objects, load_yaml_docs(rp), rp)
            else:
                raise Refused(f"{cpath}: resource {r} does not exist")
        ck = dict(ck)
        ck.pop("resources", None)
        objects, generated = apply_own(p, cpath, ck, objects, generated)

    renames = {}
    for field, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for g in k.get(field) or []:
            obj, hashed = generate(d, path, kind, g)
            add(objects, [obj], f"{path} {field} {g.get('name')}")
            generated.add(ident(obj))
            if hashed:
                renames[(kind, g["name"])] = hashed
                obj["metadata"]["name"] = hashed
                generated.add(ident(obj))
    if renames:
        for o in objects:
            rewrite_references(o, renames)

    ns = k.get("namespace")
    if ns is not None:
        if not isinstance(ns, str) or not ns:
            raise Refused(f"{path}: namespace must be a non-empty string")
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = ns
        generated = {(g, kd, None if kd in CLUSTER_SCOPED else ns, n) for g, kd, _, n in generated}

    for p in k.get("patches") or []:
        objects = apply_patch(d, path, p, objects, generated)

    for img in k.get("images") or []:
        set_image(path, img, objects)
    return objects, generated


def generate(d, path, kind, g):
    unknown = sorted(set(g) - {"name", "files", "type", "options"} - ({"type"} if kind == "Secret" else set()))
    if kind == "ConfigMap" and "type" in g:
        unknown.append("type")
    if unknown:
        raise Refused(f"{path}: {kind} generator field(s) {sorted(unknown)} not implemented")
    options = g.get("options") or {}
    if sorted(set(options) - {"disableNameSuffixHash"}):
        raise Refused(f"{path}: generator option(s) {sorted(set(options) - {'disableNameSuffixHash'})} not implemented")
    name = g.get("name")
    if not name:
        raise Refused(f"{path}: a {kind} generator without a name")
    data = {}
    for f in g.get("files") or []:
        key, eq, rel = f.partition("=")
        if not eq:
            key, rel = os.path.basename(f), f
        with open(os.path.join(d, rel), "rb") as fh:
            raw = fh.read()
        if key in data:
            raise Refused(f"{path}: {kind} {name}: key {key} twice")
        if kind == "Secret":
            data[key] = encode_base64(raw)
        else:
            try:
                data[key] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused(f"{path}: {kind} {name}: {rel} is not UTF-8 (binaryData not implemented)")
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
    if kind == "Secret":
        obj["type"] = g.get("type", "Opaque")
    if data:
        obj["data"] = data
    hashed = None
    if kind == "Secret" and not options.get("disableNameSuffixHash"):
        # Never compared with a real kustomize (no Secret here is hashed).
        raise Refused(f"{path}: Secret {name}: name-hash suffix not implemented "
                      "(set options.disableNameSuffixHash: true)")
    if not options.get("disableNameSuffixHash"):
        hashed = f"{name}-{name_hash(obj)}"
    return obj, hashed


def encode_base64(raw):
    """kustomize's base64 for Secret data: lines of 70, each ending in a
    newline, once the encoding reaches 70 characters."""
    enc = base64.b64encode(raw).decode()
    if len(enc) // 70 + 1 <= 1:
        return enc
    return "".join(enc[i : i + 70] + "\n" for i in range(0, len(enc), 70))


def go_json(v):
    """Go's encoding/json: sorted keys, no spaces, <>& and U+2028/9 escaped."""
    s = json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for c, e in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                 ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(c, e)
    return s


def name_hash(obj):
    # kustomize v5 hashes with an empty name (seen: its hashes match
    # these only so; the test compares with a real kustomize).
    m = {"kind": obj["kind"], "name": "", "data": obj.get("data") or {}}
    digest = hashlib.sha256(go_json(m).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def pod_spec(o):
    spec = o
    for key in POD_SPEC.get(o.get("kind"), ()):
        spec = spec.get(key) if isinstance(spec, dict) else None
    return spec if o.get("kind") in POD_SPEC and isinstance(spec, dict) else None


def rewrite_references(o, renames):
    spec = pod_spec(o)
    if spec is None:
        return

    def ren(holder, key, kind):
        if isinstance(holder, dict) and (kind, holder.get(key)) in renames:
            holder[key] = renames[(kind, holder[key])]

    for v in spec.get("volumes") or []:
        ren(v.get("configMap"), "name", "ConfigMap")
        ren(v.get("secret"), "secretName", "Secret")
        for s in (v.get("projected") or {}).get("sources") or []:
            ren(s.get("configMap"), "name", "ConfigMap")
            ren(s.get("secret"), "name", "Secret")
    for lst in CONTAINER_LISTS:
        for c in spec.get(lst) or []:
            for e in c.get("envFrom") or []:
                ren(e.get("configMapRef"), "name", "ConfigMap")
                ren(e.get("secretRef"), "name", "Secret")
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                ren(vf.get("configMapKeyRef"), "name", "ConfigMap")
                ren(vf.get("secretKeyRef"), "name", "Secret")
    for s in spec.get("imagePullSecrets") or []:
        ren(s, "name", "Secret")


def apply_patch(d, path, p, objects, generated):
    unknown = sorted(set(p) - {"path", "patch"})
    if unknown:
        raise Refused(f"{path}: patch field(s) {unknown} not implemented (no target/options)")
    if ("path" in p) == ("patch" in p):
        raise Refused(f"{path}: a patch needs exactly one of path, patch")
    if "path" in p:
        docs = load_yaml_docs(os.path.join(d, p["path"]))
    else:
        docs = [x for x in yaml.safe_load_all(p["patch"]) if x is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise Refused(f"{path}: only strategic-merge patches are implemented, not {doc!r:.100}")
        meta = doc.get("metadata") or {}
        want = (doc.get("apiVersion", "").rpartition("/")[0], doc.get("kind"), meta.get("name"))
        hits = [
            o for o in objects
            if (ident(o)[0], o["kind"], o["metadata"].get("name")) == want
            and (meta.get("namespace") is None or meta["namespace"] == o["metadata"].get("namespace"))
        ]
        if len(hits) != 1:
            raise Refused(f"{path}: patch for {want} matches {len(hits)} objects, not one")
        target = hits[0]
        if ident(target) in generated:
            raise Refused(f"{path}: patching generated {want} not implemented (its name hash)")
        directive = doc.get("$patch")
        if directive == "delete":
            objects = [o for o in objects if o is not target]
            continue
        if directive is not None:
            raise Refused(f"{path}: $patch: {directive} not implemented")
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
        body["metadata"] = {k: v for k, v in meta.items() if k not in ("name", "namespace")}
        merge(target, body, f"{path} {want}")
    return objects


def merge(dst, patch, where):
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise Refused(f"{where}: directive {key} not implemented")
        if value is None:
            dst.pop(key, None)
        elif isinstance(value, dict) and isinstance(dst.get(key), dict):
            merge(dst[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            if key not in MERGE_KEYS:
                raise Refused(f"{where}.{key}: strategic merge of this list not implemented")
            mk = MERGE_KEYS[key]
            have = dst.setdefault(key, [])
            # kustomize's order: the patch's items first, in its order,
            # then the others as they were.
            keys = [i.get(mk) for i in value if isinstance(i, dict)]
            have[:] = [h for k in keys for h in have if isinstance(h, dict) and h.get(mk) == k] + [
                h for h in have if not (isinstance(h, dict) and h.get(mk) in keys)
            ]
            for item in value:
                if not isinstance(item, dict) or mk not in item:
                    raise Refused(f"{where}.{key}: item without merge key {mk}")
                if "$patch" in item:
                    raise Refused(f"{where}.{key}: $patch in a list not implemented")
                same = [h for h in have if isinstance(h, dict) and h.get(mk) == item[mk]]
                if same:
                    merge(same[0], item, f"{where}.{key}[{item[mk]}]")
                else:
                    have.append(item)
        else:
            dst[key] = value


def set_image(path, img, objects):
    unknown = sorted(set(img) - {"name", "newName", "newTag", "digest"})
    if unknown or "name" not in img:
        raise Refused(f"{path}: image field(s) {unknown} not implemented, or no name: {img}")
    if "newTag" in img and "digest" in img:
        raise Refused(f"{path}: image {img['name']}: both newTag and digest")
    name = img["name"]
    for o in objects:
        spec = pod_spec(o)
        for lst in CONTAINER_LISTS:
            for c in (spec or {}).get(lst) or []:
                image = c.get("image", "")
                if image == name:
                    rest = ""
                elif image.startswith(name + "@"):
                    rest = image[len(name):]
                elif image.startswith(name + ":"):
                    rest = image[len(name):]
                else:
                    continue
                tag = rest
                if "newTag" in img:
                    tag = f":{img['newTag']}"
                elif "digest" in img:
                    tag = f"@{img['digest']}"
                c["image"] = img.get("newName", name) + tag


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "objects"):
        sys.exit(__doc__)
    if sys.argv[1] == "objects":
        print(json.dumps(load_yaml_docs(sys.argv[2])))
        return
    try:
        objects, _ = build(os.path.normpath(sys.argv[2]))
    except Refused as e:
        sys.exit(f"kustomize_render.py: {e}")
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=True, default_flow_style=False)


if __name__ == "__main__":
    main()
