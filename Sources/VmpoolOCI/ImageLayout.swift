import Foundation

/// What an image's config says about running it, as far as vmpool uses it: the defaults of
/// `exec` (`Env`, `WorkingDir`) and the user it names (`User`, kept for reference).
public struct ImageConfig: Equatable, Sendable {
    public var env: [String] = []
    public var workingDir: String?
    public var user: String?
    /// The layers' uncompressed digests (`rootfs.diff_ids`), checked as they are applied.
    var diffIDs: [String] = []

    public init(env: [String] = [], workingDir: String? = nil, user: String? = nil) {
        self.env = env
        self.workingDir = workingDir
        self.user = user
    }

    /// The text of `/.vmpool/image-config` that the guest agent reads: one `env KEY=VALUE`,
    /// `workdir PATH` or `user USER` per line. Values with a newline or NUL cannot be carried.
    public var guestText: String {
        var lines = ["# The image's defaults for commands run by vmpool exec (written by vmpool image build)."]
        for entry in env where Self.carriable(entry) && entry.contains("=") && !entry.hasPrefix("=") {
            lines.append("env " + entry)
        }
        if let workingDir, Self.carriable(workingDir), workingDir.hasPrefix("/") {
            lines.append("workdir " + workingDir)
        }
        if let user, Self.carriable(user), !user.isEmpty { lines.append("user " + user) }
        return lines.joined(separator: "\n") + "\n"
    }

    static func carriable(_ text: String) -> Bool {
        !text.contains("\n") && !text.contains("\0") && text.utf8.count < 4000
    }
}

/// One layer to apply: where its bytes are and what they must hash to.
struct LayerBlob {
    let file: String
    /// The blob's digest (OCI descriptors); nil in a docker archive.
    let digest: String?
    /// The uncompressed stream's digest (the config's diff_ids), when given.
    var diffID: String?
    let size: Int64?
}

/// An image resolved from its layout: its name, config and layers, in order.
struct ResolvedImage {
    var name: String?
    var config: ImageConfig
    var layers: [LayerBlob]
}

struct Descriptor: Decodable {
    var mediaType: String?
    var digest: String
    var size: Int64
    var annotations: [String: String]?
    var platform: Platform?

    struct Platform: Decodable {
        var architecture: String?
        var os: String?
    }
}

struct Index: Decodable {
    var manifests: [Descriptor]
}

struct Manifest: Decodable {
    var config: Descriptor
    var layers: [Descriptor]
}

struct ConfigFile: Decodable {
    var config: Inner?
    var rootfs: RootFS?

    struct Inner: Decodable {
        // swift-format-ignore: AlwaysUseLowerCamelCase
        var Env: [String]?
        // swift-format-ignore: AlwaysUseLowerCamelCase
        var WorkingDir: String?
        // swift-format-ignore: AlwaysUseLowerCamelCase
        var User: String?
    }

    struct RootFS: Decodable {
        var diff_ids: [String]?
    }
}

struct DockerManifestEntry: Decodable {
    // swift-format-ignore: AlwaysUseLowerCamelCase
    var Config: String
    // swift-format-ignore: AlwaysUseLowerCamelCase
    var RepoTags: [String]?
    // swift-format-ignore: AlwaysUseLowerCamelCase
    var Layers: [String]
}

enum ImageLayout {
    static let refName = "org.opencontainers.image.ref.name"
    static let containerdName = "io.containerd.image.name"
    static let maxLayers = 256

    /// The image `source` names in `files`.
    static func resolve(_ files: ImageFiles, source: ImageSource) throws -> ResolvedImage {
        switch source {
        case .dockerArchive: return try resolveDocker(files, reference: source.reference)
        case .ociArchive, .ociDirectory:
            if !files.has("index.json") && files.has("manifest.json") {
                return try resolveDocker(files, reference: source.reference)
            }
            return try resolveOCI(files, reference: source.reference)
        }
    }

    static func decode<T: Decodable>(_ type: T.Type, _ data: Data, _ what: String, in files: ImageFiles) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: data)
        } catch {
            throw OCIError("\(what) in \(files.display) is not valid: \(error)")
        }
    }

    /// `blobs/sha256/HEX` of a digest, which must be a SHA-256 one.
    static func blobPath(_ digest: String, in files: ImageFiles) throws -> String {
        let hexDigits = digest.dropFirst("sha256:".count)
        guard digest.hasPrefix("sha256:"), hexDigits.count == 64,
            hexDigits.allSatisfy({ ("0"..."9").contains($0) || ("a"..."f").contains($0) })
        else {
            throw OCIError("\(files.display) names a blob by \"\(digest.prefix(80))\"; only sha256 digests are read")
        }
        return "blobs/sha256/" + hexDigits
    }

    /// A blob read whole and checked against its descriptor's digest and size.
    static func blob(_ descriptor: Descriptor, _ what: String, in files: ImageFiles) throws -> Data {
        let (data, digest) = try files.read(try blobPath(descriptor.digest, in: files))
        guard digest == descriptor.digest, Int64(data.count) == descriptor.size else {
            throw OCIError(
                "the \(what) of \(files.display) does not match its digest \(descriptor.digest)"
                    + " (read \(data.count) bytes hashing to \(digest)): the archive is damaged or was altered")
        }
        return data
    }

    static func resolveOCI(_ files: ImageFiles, reference: String?) throws -> ResolvedImage {
        guard files.has("index.json") else {
            throw OCIError(
                "\(files.display) is not an OCI image layout (no index.json); for `docker save` output use"
                    + " docker-archive:PATH")
        }
        let index = try decode(Index.self, try files.read("index.json").data, "index.json", in: files)
        var candidates = index.manifests
        if let reference {
            candidates = candidates.filter {
                $0.annotations?[refName] == reference || $0.annotations?[containerdName] == reference
                    || $0.annotations?[refName].map { $0.hasSuffix(":" + reference) } == true
            }
        }
        let names = index.manifests.compactMap { $0.annotations?[refName] ?? $0.annotations?[containerdName] }
        guard candidates.count == 1, var chosen = candidates.first else {
            if candidates.isEmpty, let reference {
                throw OCIError(
                    "\(files.display) has no image named \(reference); it has: "
                        + (names.isEmpty ? "none with a name" : names.joined(separator: ", ")))
            }
            throw OCIError(
                "\(files.display) holds \(candidates.count) images; name one with :TAG after the path (it has: "
                    + (names.isEmpty ? "none with a name" : names.joined(separator: ", ")) + ")")
        }
        let name =
            chosen.annotations?[containerdName].flatMap(diskName(fromReference:))
            ?? chosen.annotations?[refName].flatMap(diskName(fromReference:))
        // An index inside the index (a multi-platform image): linux/amd64, or its only entry.
        var depth = 0
        while chosen.mediaType?.contains("index") == true || chosen.mediaType?.contains("manifest.list") == true {
            depth += 1
            guard depth <= 4 else { throw OCIError("\(files.display) nests image indexes more than 4 deep") }
            let nested = try decode(Index.self, try blob(chosen, "image index", in: files), "an image index", in: files)
            let linux = nested.manifests.filter {
                ($0.platform?.os ?? "linux") == "linux" && ($0.platform?.architecture ?? "amd64") == "amd64"
            }
            guard let next = linux.first ?? (nested.manifests.count == 1 ? nested.manifests.first : nil) else {
                throw OCIError("\(files.display) has no linux/amd64 image")
            }
            chosen = next
        }
        let manifest = try decode(Manifest.self, try blob(chosen, "manifest", in: files), "the manifest", in: files)
        var config = try readConfig(try blob(manifest.config, "config", in: files), in: files)
        guard manifest.layers.count <= maxLayers else {
            throw OCIError("\(files.display) has \(manifest.layers.count) layers; more than \(maxLayers) are refused")
        }
        var layers = try manifest.layers.map { layer in
            LayerBlob(file: try blobPath(layer.digest, in: files), digest: layer.digest, diffID: nil, size: layer.size)
        }
        try attachDiffIDs(&layers, &config)
        return ResolvedImage(name: name, config: config, layers: layers)
    }

    static func resolveDocker(_ files: ImageFiles, reference: String?) throws -> ResolvedImage {
        guard files.has("manifest.json") else {
            throw OCIError(
                "\(files.display) is not a docker archive (no manifest.json); for OCI images use oci-archive:")
        }
        let entries = try decode(
            [DockerManifestEntry].self, try files.read("manifest.json").data, "manifest.json", in: files)
        var candidates = entries
        if let reference {
            candidates = entries.filter { entry in
                (entry.RepoTags ?? []).contains { $0 == reference || $0.hasSuffix(":" + reference) }
            }
        }
        guard candidates.count == 1, let entry = candidates.first else {
            let tags = entries.flatMap { $0.RepoTags ?? [] }
            throw OCIError(
                "\(files.display) holds \(candidates.count) matching images; name one with :TAG after the path (it has: "
                    + (tags.isEmpty ? "none with a tag" : tags.joined(separator: ", ")) + ")")
        }
        let (data, digest) = try files.read(entry.Config)
        // The config's file name is its digest (`HEX.json` or `blobs/sha256/HEX`) when it is one.
        let base = entry.Config.split(separator: "/").last.map(String.init) ?? entry.Config
        let named = base.hasSuffix(".json") ? String(base.dropLast(5)) : base
        if named.count == 64, named.allSatisfy(\.isHexDigit), digest != "sha256:" + named {
            throw OCIError(
                "the config of \(files.display) does not match its name \(entry.Config) (it hashes to \(digest)):"
                    + " the archive is damaged or was altered")
        }
        var config = try readConfig(data, in: files)
        guard entry.Layers.count <= maxLayers else {
            throw OCIError("\(files.display) has \(entry.Layers.count) layers; more than \(maxLayers) are refused")
        }
        var layers = entry.Layers.map { LayerBlob(file: $0, digest: nil, diffID: nil, size: nil) }
        try attachDiffIDs(&layers, &config)
        let name = entry.RepoTags?.first.flatMap(diskName(fromReference:))
        return ResolvedImage(name: name, config: config, layers: layers)
    }

    static func readConfig(_ data: Data, in files: ImageFiles) throws -> ImageConfig {
        let file = try decode(ConfigFile.self, data, "the image config", in: files)
        var config = ImageConfig(
            env: file.config?.Env ?? [], workingDir: file.config?.WorkingDir, user: file.config?.User)
        config.diffIDs = file.rootfs?.diff_ids ?? []
        return config
    }

    static func attachDiffIDs(_ layers: inout [LayerBlob], _ config: inout ImageConfig) throws {
        guard config.diffIDs.count == layers.count else {
            throw OCIError(
                "the image's config lists \(config.diffIDs.count) layers (rootfs.diff_ids) but its manifest"
                    + " \(layers.count): the archive is damaged or was altered")
        }
        for index in layers.indices { layers[index].diffID = config.diffIDs[index] }
    }
}
