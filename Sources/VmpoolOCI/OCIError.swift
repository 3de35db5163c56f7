/// Why an image archive could not be turned into a root disk.
public struct OCIError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
