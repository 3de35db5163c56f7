import Crypto
import Foundation
import VmpoolArchive

/// One entry of a hand-made image layer.
public struct LayerItem: Sendable {
    public var entry: TarEntry
    public var data: [UInt8]

    public init(entry: TarEntry, data: [UInt8]) {
        self.entry = entry
        self.data = data
    }

    public static func file(
        _ name: String, _ content: String, mode: UInt32 = 0o644, uid: UInt32 = 0, gid: UInt32 = 0
    ) -> LayerItem {
        let data = Array(content.utf8)
        return LayerItem(
            entry: TarEntry(
                name: Array(name.utf8), kind: .file, mode: mode, size: Int64(data.count), mtime: 1_700_000_000,
                uid: uid, gid: gid),
            data: data)
    }

    public static func directory(_ name: String, mode: UInt32 = 0o755, uid: UInt32 = 0, gid: UInt32 = 0)
        -> LayerItem
    {
        LayerItem(entry: TarEntry(name: Array(name.utf8), kind: .directory, mode: mode, uid: uid, gid: gid), data: [])
    }

    public static func symlink(_ name: String, to target: String, uid: UInt32 = 0, gid: UInt32 = 0) -> LayerItem {
        LayerItem(
            entry: TarEntry(
                name: Array(name.utf8), kind: .symlink, linkTarget: Array(target.utf8), mode: 0o777, uid: uid,
                gid: gid),
            data: [])
    }

    public static func hardLink(_ name: String, to target: String) -> LayerItem {
        LayerItem(entry: TarEntry(name: Array(name.utf8), kind: .hardLink, linkTarget: Array(target.utf8)), data: [])
    }

    /// `.wh.NAME` next to NAME: hides NAME of the layers below.
    public static func whiteout(_ path: String) -> LayerItem {
        var parts = path.split(separator: "/").map(String.init)
        let leaf = parts.removeLast()
        return .file((parts + [".wh." + leaf]).joined(separator: "/"), "", mode: 0o600)
    }

    /// `DIR/.wh..wh..opq`: hides everything the layers below put in DIR.
    public static func opaque(_ directory: String) -> LayerItem {
        .file(directory + "/.wh..wh..opq", "", mode: 0o600)
    }
}

/// Writes image layers and OCI image archives (as `buildah push ... oci-archive:` does) for
/// tests: tar layers from `LayerItem`s, optionally gzip-compressed, with correct digests.
public enum OCIImageBuilder {
    /// A layer as an uncompressed tar stream.
    public static func layer(_ items: [LayerItem]) throws -> [UInt8] {
        var bytes: [UInt8] = []
        let writer = TarWriter { bytes.append(contentsOf: $0) }
        for item in items {
            try writer.appendHeader(item.entry)
            if item.entry.kind == .file {
                try item.data.withUnsafeBytes { try writer.appendData($0) }
                try writer.endData(size: Int64(item.data.count))
            }
        }
        try writer.finish()
        return bytes
    }

    public static func sha256(_ bytes: [UInt8]) -> String {
        "sha256:" + SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
    }

    /// `gzip -nc` of `bytes`.
    public static func gzip(_ bytes: [UInt8]) throws -> [UInt8] {
        let dir = TemporaryDirectory(prefix: "gz")
        defer { dir.remove() }
        let input = dir.path + "/in"
        _ = FileManager.default.createFile(atPath: input, contents: Data(bytes))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "gzip -nc < \"$1\" > \"$1.gz\"", "sh", input]
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0, let data = FileManager.default.contents(atPath: input + ".gz") else {
            throw SandboxError("gzip failed")
        }
        return Array(data)
    }

    /// Writes an OCI image archive of `layers` (each compressed when `gzip`) to `path`; the
    /// index names the image `name` (the ref.name annotation) when given. `tamper` changes
    /// the first layer's bytes after its digest was taken.
    public static func writeArchive(
        _ layers: [[LayerItem]], to path: String, name: String? = nil, env: [String] = [], workingDir: String? = nil,
        user: String? = nil, gzip compress: Bool = true, tamper: Bool = false
    ) throws {
        var blobs: [(String, [UInt8])] = []
        var descriptors: [[String: Any]] = []
        var diffIDs: [String] = []
        for (index, items) in layers.enumerated() {
            let tar = try layer(items)
            diffIDs.append(sha256(tar))
            var blob = compress ? try gzip(tar) : tar
            let digest = sha256(blob)
            if tamper && index == 0 { blob[blob.count / 2] ^= 0xFF }
            blobs.append((digest, blob))
            descriptors.append([
                "mediaType": compress
                    ? "application/vnd.oci.image.layer.v1.tar+gzip" : "application/vnd.oci.image.layer.v1.tar",
                "digest": digest, "size": blob.count,
            ])
        }
        var inner: [String: Any] = ["Env": env]
        if let workingDir { inner["WorkingDir"] = workingDir }
        if let user { inner["User"] = user }
        let config = try json([
            "architecture": "amd64", "os": "linux", "config": inner,
            "rootfs": ["type": "layers", "diff_ids": diffIDs],
        ])
        blobs.append((sha256(config), config))
        let manifest = try json([
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": [
                "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                "size": config.count,
            ],
            "layers": descriptors,
        ])
        blobs.append((sha256(manifest), manifest))
        var descriptor: [String: Any] = [
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(manifest),
            "size": manifest.count,
        ]
        if let name { descriptor["annotations"] = ["org.opencontainers.image.ref.name": name] }
        let index = try json(["schemaVersion": 2, "manifests": [descriptor]])

        var bytes: [UInt8] = []
        let writer = TarWriter { bytes.append(contentsOf: $0) }
        func add(_ name: String, _ data: [UInt8]) throws {
            try writer.appendHeader(TarEntry(name: Array(name.utf8), kind: .file, size: Int64(data.count)))
            try data.withUnsafeBytes { try writer.appendData($0) }
            try writer.endData(size: Int64(data.count))
        }
        try add("oci-layout", Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8))
        try add("index.json", index)
        try writer.appendHeader(TarEntry(name: Array("blobs".utf8), kind: .directory, mode: 0o755))
        try writer.appendHeader(TarEntry(name: Array("blobs/sha256".utf8), kind: .directory, mode: 0o755))
        for (digest, blob) in blobs { try add("blobs/sha256/" + digest.dropFirst(7), blob) }
        try writer.finish()
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
            throw SandboxError("cannot write \(path)")
        }
    }

    /// Writes a docker archive (as `docker save` writes one: manifest.json, `ID/layer.tar`,
    /// `HEX.json`) of uncompressed `layers` to `path`, tagged `tag` when given.
    public static func writeDockerArchive(
        _ layers: [[LayerItem]], to path: String, tag: String? = nil, env: [String] = [], workingDir: String? = nil
    ) throws {
        let tars = try layers.map { try layer($0) }
        var inner: [String: Any] = ["Env": env]
        if let workingDir { inner["WorkingDir"] = workingDir }
        let config = try json([
            "architecture": "amd64", "os": "linux", "config": inner,
            "rootfs": ["type": "layers", "diff_ids": tars.map(sha256)],
        ])
        let configName = String(sha256(config).dropFirst(7)) + ".json"
        let layerNames = tars.map { String(sha256($0).dropFirst(7)) + "/layer.tar" }
        var entry: [String: Any] = ["Config": configName, "Layers": layerNames]
        if let tag { entry["RepoTags"] = [tag] }
        let manifest = try json([entry])
        var bytes: [UInt8] = []
        let writer = TarWriter { bytes.append(contentsOf: $0) }
        func add(_ name: String, _ data: [UInt8]) throws {
            try writer.appendHeader(TarEntry(name: Array(name.utf8), kind: .file, size: Int64(data.count)))
            try data.withUnsafeBytes { try writer.appendData($0) }
            try writer.endData(size: Int64(data.count))
        }
        for (name, tar) in zip(layerNames, tars) {
            try writer.appendHeader(
                TarEntry(name: Array(name.split(separator: "/")[0].utf8), kind: .directory, mode: 0o755))
            try add(name, tar)
        }
        try add(configName, config)
        try add("manifest.json", manifest)
        try writer.finish()
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
            throw SandboxError("cannot write \(path)")
        }
    }

    static func json(_ object: Any) throws -> [UInt8] {
        Array(try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
    }
}
