/// Splits long answers into parts a platform accepts, at paragraph or line boundaries, avoiding cuts inside
/// fenced code blocks when possible. Nothing is dropped: joining the parts gives back the text.
public struct TextSplitter: Sendable {
    public var maxCharacters: Int
    public init(maxCharacters: Int) {
        precondition(maxCharacters > 0)
        self.maxCharacters = maxCharacters
    }

    public func split(_ text: String) -> [String] {
        guard text.count > maxCharacters else { return [text] }
        var parts: [String] = []
        var rest = Substring(text)
        while rest.count > maxCharacters {
            let cut = cutIndex(in: rest)
            parts.append(String(rest[..<cut]))
            rest = rest[cut...]
        }
        if !rest.isEmpty { parts.append(String(rest)) }
        return parts
    }

    /// The best place to end the next part: after a blank line outside code, else after a line break
    /// outside code, else after any line break, else at the limit.
    private func cutIndex(in text: Substring) -> String.Index {
        let limit = text.index(text.startIndex, offsetBy: maxCharacters)
        var paragraphOutside: String.Index?
        var lineOutside: String.Index?
        var lineAny: String.Index?
        var inCode = false
        var lineStart = text.startIndex
        var index = text.startIndex
        while index < limit {
            let char = text[index]
            let next = text.index(after: index)
            if char == "\n" {
                let line = text[lineStart..<index]
                if line.trimmingPrefixWhitespace().hasPrefix("```") { inCode.toggle() }
                lineAny = next
                if !inCode {
                    lineOutside = next
                    if line.allSatisfy(\.isWhitespace) { paragraphOutside = next }
                }
                lineStart = next
            }
            index = next
        }
        let minimum = maxCharacters / 4
        func acceptable(_ i: String.Index?) -> String.Index? {
            guard let i, text.distance(from: text.startIndex, to: i) >= minimum else { return nil }
            return i
        }
        return acceptable(paragraphOutside) ?? acceptable(lineOutside) ?? acceptable(lineAny) ?? limit
    }
}

extension Substring {
    fileprivate func trimmingPrefixWhitespace() -> Substring {
        drop(while: { $0 == " " || $0 == "\t" })
    }
}
