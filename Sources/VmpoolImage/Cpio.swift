import Foundation

/// Writes `newc` cpio archives, the format the Linux kernel unpacks as an initramfs.
///
/// Written here rather than shelling out to cpio so that ownership (root), modes and
/// device nodes come out right without root privileges or fakeroot.
struct CpioWriter {
    private(set) var data = Data()
    private var inode: UInt32 = 1

    enum Kind {
        case directory
        case file(Data, executable: Bool)
        case symlink(String)
        case characterDevice(major: UInt32, minor: UInt32)
    }

    mutating func add(_ path: String, _ kind: Kind) {
        let mode: UInt32
        let body: Data
        var devMajor: UInt32 = 0
        var devMinor: UInt32 = 0
        switch kind {
        case .directory:
            mode = 0o040755
            body = Data()
        case .file(let contents, let executable):
            mode = executable ? 0o100755 : 0o100644
            body = contents
        case .symlink(let target):
            mode = 0o120777
            body = Data(target.utf8)
        case .characterDevice(let major, let minor):
            mode = 0o020600
            body = Data()
            devMajor = major
            devMinor = minor
        }
        let nlink: UInt32 = if case .directory = kind { 2 } else { 1 }
        let fields: [UInt32] = [
            inode, mode, 0, 0, nlink, 0, UInt32(body.count), 0, 0, devMajor, devMinor, UInt32(path.utf8.count + 1), 0,
        ]
        inode += 1
        var header = "070701"
        for field in fields { header += String(format: "%08X", field) }
        data.append(Data(header.utf8))
        data.append(Data(path.utf8))
        data.append(0)
        pad()
        data.append(body)
        pad()
    }

    /// Ends the archive with the `TRAILER!!!` entry.
    mutating func finish() {
        inode = 0
        let fields: [UInt32] = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0]
        var header = "070701"
        for field in fields { header += String(format: "%08X", field) }
        data.append(Data(header.utf8))
        data.append(Data("TRAILER!!!".utf8))
        data.append(0)
        pad()
    }

    private mutating func pad() {
        while data.count % 4 != 0 { data.append(0) }
    }
}
