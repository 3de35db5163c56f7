import Foundation
import Testing
import VmpoolDriver
import VmpoolTestSupport

/// Strings from clients and guests reach terminals through `get`, `describe`, `events` and
/// logs: a holder is refused when it holds control characters, and whatever is already in a
/// store (written by an older vmpool, or a peer host) is shown escaped.
@Suite("Terminal safety of stored strings", .serialized)
struct TerminalSafetyTests {
    static let hostile = "evil\u{1B}[31mRED\u{1B}[0m \u{07}bell\u{9B}2J\u{202E}txt.exe"

    static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        let value = scalar.value
        if value == 0x0A || value == 0x09 { return false }
        return value < 0x20 || (0x7F...0x9F).contains(value) || (0x202A...0x202E).contains(value)
    }

    @Test func aHolderWithControlCharactersIsRefused() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 1))).status == 0)
        for holder in [Self.hostile, "tab\there", "line\nbreak", "\u{9B}csi"] {
            let result = try box.run("lease", "web", "--holder", holder)
            #expect(result.status == 1, "holder \(holder.debugDescription): exit \(result.status)")
            #expect(result.stderr.contains("--holder: control characters are not allowed"), "\(result.stderr)")
            #expect(
                !result.stderr.contains("\u{1B}") && !result.stderr.contains("\u{07}"),
                "\(result.stderr.debugDescription)")
        }
        #expect(try box.vms().values.allSatisfy { $0["lease"] is NSNull }, "nothing was leased")
    }

    /// A holder written into the store behind vmpool's back comes out of every text view with
    /// its control characters escaped, and out of JSON intact.
    @Test func storedControlCharactersAreEscapedOnTheTerminal() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 1))).status == 0)
        let lease = try box.run("lease", "web", "--holder", "plain")
        #expect(lease.status == 0, "\(lease.stderr)")
        let id = lease.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let script = """
            import sqlite3, sys
            db = sqlite3.connect(sys.argv[1])
            db.execute("UPDATE vm SET leaseHolder = ? WHERE id = ?", (sys.argv[2], sys.argv[3]))
            db.execute("UPDATE event SET message = ? WHERE kind = 'leased'", ("to " + sys.argv[2],))
            db.commit()
            """
        let python = try RunningCommand(
            path: "/usr/bin/env", arguments: ["python3", "-c", script, box.state + "/state.sqlite", Self.hostile, id],
            environment: ProcessInfo.processInfo.environment
        ).wait()
        #expect(python.status == 0, "\(python.stderr)")
        let views = [
            ["get", "vms"], ["describe", "vm", id], ["describe", "pool", "web"], ["events"],
        ]
        for view in views {
            let result = try box.binary.run(view + ["--log-level", "debug", "--state-dir", box.state])
            #expect(result.status == 0, "\(view): \(result.stderr)")
            for (name, text) in [("stdout", result.stdout), ("stderr", result.stderr)] {
                let bad = text.unicodeScalars.filter { Self.isControl($0) }
                #expect(bad.isEmpty, "\(view) \(name) has raw control characters: \(text.debugDescription)")
            }
            #expect(result.stdout.contains("evil\\u001b[31mRED"), "\(view) shows the holder escaped: \(result.stdout)")
        }
        let json = try box.run("get", "vms", "-o", "json")
        let rows = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [[String: Any]] ?? []
        let holder = (rows.first { $0["id"] as? String == id }?["lease"] as? [String: Any])?["holder"] as? String
        #expect(holder == Self.hostile, "JSON keeps the holder exactly: \(holder.debugDescription)")
        #expect(!json.stdout.contains("\u{1B}") && !json.stdout.contains("\u{9B}"), "JSON is escaped too")
    }

    /// Console output shown on a terminal keeps colours and line ends; cursor moves, title
    /// changes (OSC), bells, C1 controls and bidi overrides are shown escaped.
    @Test func consoleOutputOnATerminalKeepsColoursOnly() {
        let input = Array(
            "[  \u{1B}[0;32mOK\u{1B}[0m  ] boot\r\n\u{1B}]0;pwned\u{07}\u{1B}[2J\u{9B}31m\u{202E}x\tend\n".utf8)
        let output = String(decoding: TerminalText.safeConsole(input), as: UTF8.self)
        #expect(output.contains("\u{1B}[0;32mOK\u{1B}[0m"), "colours pass: \(output.debugDescription)")
        #expect(output.contains("boot\r\n") && output.contains("\tend\n"))
        #expect(
            output.contains("\\u001b]0;pwned\\u0007") && output.contains("\\u001b[2J"), "\(output.debugDescription)")
        #expect(output.contains("\\u009b31m") && output.contains("\\u202ex"), "\(output.debugDescription)")
        let raw = output.unicodeScalars.filter { $0 == "\u{07}" || $0 == "\u{9B}" || $0 == "\u{202E}" }
        #expect(raw.isEmpty)
        // Bytes that are not UTF-8 pass unchanged.
        #expect(TerminalText.safeConsole([0xFF, 0xC2, 0x41]) == [0xFF, 0xC2, 0x41])
    }
}
