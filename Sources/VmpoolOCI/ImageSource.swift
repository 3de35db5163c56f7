/// Where an image comes from, as `image build --from` takes it (the transports' names are
/// skopeo's and podman's).
public enum ImageSource: Equatable, Sendable {
    /// `oci-archive:PATH[:REF]`: a tar of an OCI image layout (`buildah push`, `skopeo copy`,
    /// `podman save --format oci-archive`).
    case ociArchive(path: String, reference: String?)
    /// `oci:DIR[:REF]`: an OCI image layout directory.
    case ociDirectory(path: String, reference: String?)
    /// `docker-archive:PATH`: `docker save` or `podman save` (the default format).
    case dockerArchive(path: String, reference: String?)

    /// Parses `TRANSPORT:PATH[:REF]`; REF is what follows the last colon when no `/` follows it.
    public init(parsing text: String) throws {
        let transports = ["oci-archive", "oci", "docker-archive"]
        guard let colon = text.firstIndex(of: ":"), transports.contains(String(text[..<colon])) else {
            throw OCIError(
                "--from \(text): name the image as oci-archive:PATH, oci:DIR[:TAG] or docker-archive:PATH"
                    + " (from podman save, buildah push or skopeo copy)")
        }
        let transport = String(text[..<colon])
        var path = String(text[text.index(after: colon)...])
        var reference: String?
        if let last = path.lastIndex(of: ":"), !path[path.index(after: last)...].contains("/") {
            reference = String(path[path.index(after: last)...])
            path = String(path[..<last])
        }
        guard !path.isEmpty else { throw OCIError("--from \(text): the path is empty") }
        if reference?.isEmpty == true { reference = nil }
        switch transport {
        case "oci-archive": self = .ociArchive(path: path, reference: reference)
        case "oci": self = .ociDirectory(path: path, reference: reference)
        default: self = .dockerArchive(path: path, reference: reference)
        }
    }

    public var path: String {
        switch self {
        case .ociArchive(let path, _), .ociDirectory(let path, _), .dockerArchive(let path, _): path
        }
    }

    public var reference: String? {
        switch self {
        case .ociArchive(_, let reference), .ociDirectory(_, let reference), .dockerArchive(_, let reference):
            reference
        }
    }
}

/// The disk name an image reference gives: its repository's last component, without tag or
/// digest (`docker.io/library/alpine:3.19` -> `alpine`); nil when that is not a safe file name.
public func diskName(fromReference reference: String) -> String? {
    var text = reference
    if let at = text.firstIndex(of: "@") { text = String(text[..<at]) }
    var last = text.split(separator: "/").last.map(String.init) ?? text
    if let colon = last.firstIndex(of: ":") { last = String(last[..<colon]) }
    return isSafeDiskName(last) ? last : nil
}

/// A name that can be a file name on any host: letters, digits, `.`, `_`, `-`; not starting
/// with a dot or a dash; at most 100 characters.
public func isSafeDiskName(_ name: String) -> Bool {
    let bytes = Array(name.utf8)
    guard !bytes.isEmpty, bytes.count <= 100, bytes[0] != UInt8(ascii: "."), bytes[0] != UInt8(ascii: "-") else {
        return false
    }
    return bytes.allSatisfy {
        (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0)
            || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-")
    }
}
