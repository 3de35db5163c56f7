import Foundation
import VmpoolCLI

@main
enum Entry {
    static func main() async {
        // Everything vmpool creates (state files, sockets, memory files) is private to its user.
        umask(0o077)
        exit(await Vmpool.runMain())
    }
}
