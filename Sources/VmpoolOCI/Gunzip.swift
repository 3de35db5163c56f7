import CVmpoolZlib

/// A gzip stream decompressed as it is read (zlib), for compressed layers.
final class Gunzip {
    typealias Source = (UnsafeMutableRawBufferPointer) throws -> Int

    private let source: Source
    private let stream: OpaquePointer
    private let input: UnsafeMutableRawBufferPointer
    private var low = 0
    private var high = 0
    private var inMember = false
    private var atEnd = false
    private let name: String

    init(name: String, source: @escaping Source) throws {
        guard let stream = vmpool_gunzip_new() else { throw OCIError("out of memory starting gzip for \(name)") }
        self.stream = stream
        self.source = source
        self.name = name
        input = .allocate(byteCount: 256 << 10, alignment: 16)
    }

    deinit {
        vmpool_gunzip_free(stream)
        input.deallocate()
    }

    /// Fills `output` with decompressed bytes; 0 at the end of the stream.
    func read(into output: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            if low == high && !atEnd {
                low = 0
                high = try source(input)
                if high == 0 { atEnd = true }
            }
            if low == high && atEnd {
                if inMember { throw OCIError("\(name): the gzip stream is cut short") }
                return 0
            }
            var used = 0
            var made = 0
            var message: UnsafePointer<CChar>?
            let status = vmpool_gunzip_step(
                stream, input.baseAddress! + low, high - low, &used, output.baseAddress, output.count, &made, &message)
            if status < 0 {
                throw OCIError(
                    "\(name): corrupt gzip data (\(message.map { String(cString: $0) } ?? "inflate failed"))")
            }
            low += used
            inMember = status != 1 && (inMember || used > 0)
            if made > 0 { return made }
            if used == 0 && status == 0 && low < high {
                throw OCIError("\(name): corrupt gzip data (no progress)")
            }
        }
    }
}
