import Foundation
import Testing

@testable import VmpoolQEMU

/// A saved template's memory file gives back its all-zero pages and reads the same after.
@Suite("Template memory files")
struct TemplateMemoryTests {
    static let page = 4096
    /// lseek's SEEK_DATA and SEEK_HOLE (Linux), which Glibc's Swift module does not export.
    static let seekData: Int32 = 3
    static let seekHole: Int32 = 4

    /// The allocated 4 KiB pages of `path` that hold only zeros.
    static func zeroPages(_ path: String) throws -> Int {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0, "cannot open \(path)")
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var zeros = 0
        var offset = lseek(fd, 0, seekData)
        while offset >= 0 {
            let end = lseek(fd, offset, seekHole)
            while offset < end {
                let got = buffer.withUnsafeMutableBytes {
                    pread(fd, $0.baseAddress, min($0.count, Int(end - offset)), offset)
                }
                try #require(got > 0, "read \(path) at \(offset)")
                for start in stride(from: 0, to: got - page + 1, by: page)
                where buffer[start..<start + page].allSatisfy({ $0 == 0 }) {
                    zeros += 1
                }
                offset += off_t(got)
            }
            offset = lseek(fd, end, seekData)
        }
        return zeros
    }

    static func allocated(_ path: String) -> Int {
        var info = stat()
        return stat(path, &info) == 0 ? Int(info.st_blocks) * 512 : -1
    }

    @Test func zeroPagesBecomeHolesAndTheFileReadsTheSame() throws {
        // On tmpfs, where template memory files live.
        let path = "/dev/shm/vmpool-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).mem"
        defer { unlink(path) }
        // Pages: data, zero, zero, data, zero, a hole (never written), 249 zero, two data, then
        // 300 zero pages that the 1 MiB reads split in three.
        let layout: [UInt8?] =
            [7, 0, 0, 9, 0, nil] + Array(repeating: 0, count: 249) + [3, 5] + Array(repeating: 0, count: 300)
        var written = Data()
        for (index, fill) in layout.enumerated() {
            var bytes = [UInt8](repeating: fill ?? 0, count: Self.page)
            if fill != nil && fill != 0 { bytes[index % Self.page] = 1 }
            written.append(contentsOf: bytes)
        }
        // Written page by page, all but the hole: a guest page nobody touched is one too.
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        for (index, fill) in layout.enumerated() where fill != nil {
            let done = written.withUnsafeBytes {
                pwrite(fd, $0.baseAddress! + index * Self.page, Self.page, off_t(index * Self.page))
            }
            try #require(done == Self.page)
        }
        close(fd)
        let zeros = layout.filter { $0 == 0 }.count
        #expect(try Self.zeroPages(path) == zeros)
        let before = Self.allocated(path)

        let freed = try #require(QemuDriver.freeZeroPages(path))
        #expect(freed == Int64(zeros * Self.page))
        #expect(Self.allocated(path) == before - zeros * Self.page)
        #expect(try Self.zeroPages(path) == 0)
        #expect(FileManager.default.contents(atPath: path) == written)
        // A second pass finds nothing left to give back.
        #expect(QemuDriver.freeZeroPages(path) == 0)
        // A file that cannot be opened read-write gives nothing back and is left alone.
        #expect(QemuDriver.freeZeroPages(path + ".missing") == nil)
    }
}
